//! Memory suture maps inside the target: named so that `/proc/PID/maps`
//! shows whose it is, placed near the code that must reach it with rel32
//! jumps and calls.

use crate::record::{Arena, Region};
use crate::Error;
use suture_process::{find_gap_near, Hijack, Mapping};

pub const PROT_RW: i32 = libc::PROT_READ | libc::PROT_WRITE;
pub const PROT_RX: i32 = libc::PROT_READ | libc::PROT_EXEC;
pub const PAGE: u64 = 4096;

/// memfd name of site arenas.
pub const ARENA_NAME: &str = "suture-sites";
/// Size of one arena and of its slots.
pub const ARENA_SIZE: u64 = 64 * 1024;
pub const SLOT_SIZE: u64 = 512;
/// Offset in a slot of the absolute-jump stub (the trampoline comes first).
pub const SLOT_STUB: u64 = 192;
/// Offset in a slot of the dispatch stub used during transitions.
pub const SLOT_DISPATCH: u64 = 256;
/// memfd name of the pending tables of transitions.
pub const TABLE_NAME: &str = "suture-threads";

pub fn page_up(n: u64) -> u64 {
    n.div_ceil(PAGE) * PAGE
}

/// Map `size` bytes named `/memfd:NAME` in the target: at `at` exactly
/// (without replacing anything) when given, else where the kernel likes.
pub fn create_named_mapping(
    hijack: &mut Hijack<'_>,
    name: &str,
    size: u64,
    at: Option<u64>,
    prot: i32,
    noreserve: bool,
) -> Result<u64, Error> {
    create_mapping(hijack, name, size, at, prot, noreserve, &[])
}

/// The protection of each region of an image: `(offset, len, prot)`.
pub fn image_protections(regions: &[suture_elf::Region]) -> Vec<(u64, u64, i32)> {
    regions
        .iter()
        .map(|r| {
            let prot = (if r.prot.r { libc::PROT_READ } else { 0 })
                | (if r.prot.w { libc::PROT_WRITE } else { 0 })
                | (if r.prot.x { libc::PROT_EXEC } else { 0 });
            (r.offset, page_up(r.len), prot)
        })
        .collect()
}

/// Like [`create_named_mapping`]; then each of `regions` (`(offset, len,
/// prot)` within the mapping) is mapped again from the same file with its
/// own protection (`MAP_FIXED` over the mapping just made). No `mprotect`
/// is ever needed: it works in processes whose seccomp filter forbids
/// `mprotect`, and no page ever gains a permission (memory-deny-write-execute).
pub fn create_mapping(
    hijack: &mut Hijack<'_>,
    name: &str,
    size: u64,
    at: Option<u64>,
    prot: i32,
    noreserve: bool,
    regions: &[(u64, u64, i32)],
) -> Result<u64, Error> {
    let fd = hijack.memfd_create(name, libc::MFD_CLOEXEC)?;
    let result = (|| {
        hijack.ftruncate(fd, size)?;
        let mut flags = libc::MAP_PRIVATE;
        if noreserve {
            flags |= libc::MAP_NORESERVE;
        }
        if at.is_some() {
            flags |= libc::MAP_FIXED_NOREPLACE;
        }
        let addr = hijack.mmap(at.unwrap_or(0), size, prot, flags, fd, 0)?;
        if let Some(want) = at {
            if addr != want {
                // Old kernels ignore MAP_FIXED_NOREPLACE and treat it as a hint.
                let _ = hijack.munmap(addr, size);
                return Err(Error::Placement(format!(
                    "the kernel placed the mapping at {addr:#x} instead of {want:#x}"
                )));
            }
        }
        for &(off, len, p) in regions {
            if p == prot {
                continue;
            }
            let fixed = libc::MAP_PRIVATE | libc::MAP_FIXED;
            match hijack.mmap(addr + off, len, p, fixed, fd, off) {
                Ok(a) if a == addr + off => {}
                r => {
                    let _ = hijack.munmap(addr, size);
                    r?;
                    return Err(Error::Placement(format!(
                        "the kernel did not map the image region at {:#x}",
                        addr + off
                    )));
                }
            }
        }
        Ok(addr)
    })();
    let closed = hijack.close(fd);
    let addr = result?;
    closed?;
    Ok(addr)
}

/// Map `size` bytes within rel32 reach of [near_start, near_end), trying a
/// few gaps in case another thread maps memory at the same time.
pub fn map_near(
    hijack: &mut Hijack<'_>,
    maps: &[Mapping],
    name: &str,
    size: u64,
    near: (u64, u64),
    prot: i32,
) -> Result<Option<u64>, Error> {
    map_regions_near(hijack, maps, name, size, near, prot, &[])
}

/// [`map_near`] with regions mapped with their own protection (see
/// [`create_mapping`]).
pub fn map_regions_near(
    hijack: &mut Hijack<'_>,
    maps: &[Mapping],
    name: &str,
    size: u64,
    near: (u64, u64),
    prot: i32,
    regions: &[(u64, u64, i32)],
) -> Result<Option<u64>, Error> {
    let mut maps = maps.to_vec();
    for _ in 0..4 {
        let Some(gap) = find_gap_near(&maps, near.0, near.1, size) else {
            return Ok(None);
        };
        match create_mapping(hijack, name, size, Some(gap), prot, false, regions) {
            Ok(a) => return Ok(Some(a)),
            Err(Error::Process(suture_process::Error::Remote { .. })) => {
                // Raced with the target's own mmap: treat the gap as taken.
                maps.push(Mapping {
                    start: gap,
                    end: gap + size,
                    perms: "---p".into(),
                    offset: 0,
                    dev: "00:00".into(),
                    inode: 0,
                    path: None,
                });
                maps.sort_by_key(|m| m.start);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// A new arena within reach of an object's code.
pub fn new_arena(
    hijack: &mut Hijack<'_>,
    maps: &[Mapping],
    near: (u64, u64),
) -> Result<Arena, Error> {
    let addr = map_near(hijack, maps, ARENA_NAME, ARENA_SIZE, near, PROT_RX)?.ok_or_else(|| {
        Error::Placement(format!(
            "no free address range within ±2 GiB of {:#x}-{:#x} for the site trampolines",
            near.0, near.1
        ))
    })?;
    Ok(Arena {
        region: Region {
            addr,
            len: ARENA_SIZE,
        },
        slot_size: SLOT_SIZE,
        used: Default::default(),
    })
}

/// Write a linked image at its base, mapped with each region's final
/// protection already ([`create_mapping`] with [`image_protections`]).
/// Images are mapped read+execute from the start and written through
/// `/proc/PID/mem`, so no region ever gains execute permission: that works
/// in processes with memory-deny-write-execute (`PR_SET_MDWE`), nothing is
/// ever writable and executable at once, and no `mprotect` is needed (a
/// seccomp filter may forbid it).
pub fn install_image(
    proc: &suture_process::Process,
    image: &suture_elf::LinkedImage,
    base: u64,
) -> Result<(), Error> {
    proc.write_mem(base, &image.bytes)?;
    Ok(())
}

/// The record of an image installed at `base` (`size` bytes mapped).
pub fn image_memory(
    image: &suture_elf::LinkedImage,
    base: u64,
    size: u64,
    file: String,
) -> crate::record::PatchMemory {
    let text = image.text_range();
    crate::record::PatchMemory {
        image: Region {
            addr: base,
            len: size,
        },
        text: Region {
            addr: text.0,
            len: text.1 - text.0,
        },
        file,
        funcs: Vec::new(),
        eh_frame: image.eh_frame(),
        uses_runtime: false,
    }
}
