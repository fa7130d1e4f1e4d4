//! Finding free address space within rel32 reach of some code.

use crate::Mapping;

/// Page size on x86_64 Linux.
pub const PAGE_SIZE: u64 = 4096;
/// Lowest address `mmap` may use (the usual `vm.mmap_min_addr`).
pub const MMAP_MIN_ADDR: u64 = 0x1_0000;
/// End of the user address space with 4-level page tables (exclusive),
/// minus the last page, which the kernel never hands out.
pub const USER_SPACE_END: u64 = 0x7fff_ffff_f000;
/// Safety margin subtracted from the ±2 GiB reach of a rel32 displacement
/// (covers instruction lengths and displacement rounding many times over).
pub const REL32_MARGIN: u64 = 1 << 20;
/// Largest distance between any two bytes that rel32 code may bridge here.
pub const REL32_REACH: u64 = (1 << 31) - REL32_MARGIN;
/// Address space below a `[stack]` mapping that is kept free: the kernel's
/// default `stack_guard_gap` (256 pages); the main stack grows down into it.
pub const STACK_GUARD: u64 = 256 * PAGE_SIZE;
/// Address space above `[heap]` that is kept free so `brk` can still grow.
pub const HEAP_RESERVE: u64 = 64 << 20;

fn align_up(x: u64) -> Option<u64> {
    x.checked_add(PAGE_SIZE - 1).map(|v| v & !(PAGE_SIZE - 1))
}

fn align_down(x: u64) -> u64 {
    x & !(PAGE_SIZE - 1)
}

/// Finds a free, page-aligned range of `size` bytes (rounded up to whole
/// pages) such that every byte of it lies within [`REL32_REACH`] of every byte
/// of `[near_start, near_end)` — so rel32 jumps and calls reach both ways.
///
/// The range overlaps no mapping, lies within `[MMAP_MIN_ADDR,
/// USER_SPACE_END)`, stays out of the stack guard gap below `[stack]` and
/// out of [`HEAP_RESERVE`] above `[heap]`. Among candidates the one closest
/// to the near range wins (ties: the lower address). Returns its start, or
/// `None` when nothing fits.
pub fn find_gap_near(maps: &[Mapping], near_start: u64, near_end: u64, size: u64) -> Option<u64> {
    if size == 0 {
        return None;
    }
    let size = align_up(size)?;
    // An empty near range means the single byte at near_start.
    let near_end = near_end.max(near_start.checked_add(1)?);
    let near_last = near_end - 1;
    if near_last - near_start > REL32_REACH {
        return None;
    }
    // Every byte b of the gap must satisfy near_last - REACH <= b <= near_start + REACH.
    let window_lo = align_up(near_last.saturating_sub(REL32_REACH).max(MMAP_MIN_ADDR))?;
    let window_hi = align_down(
        near_start
            .saturating_add(REL32_REACH)
            .saturating_add(1)
            .min(USER_SPACE_END),
    ); // exclusive
    if window_hi <= window_lo || window_hi - window_lo < size {
        return None;
    }

    // Occupied ranges, widened by the reserves, sorted by start.
    let mut taken: Vec<(u64, u64)> = maps
        .iter()
        .filter(|m| m.end > m.start)
        .map(|m| match m.path.as_deref() {
            Some("[stack]") => (m.start.saturating_sub(STACK_GUARD), m.end),
            Some("[heap]") => (m.start, m.end.saturating_add(HEAP_RESERVE)),
            _ => (m.start, m.end),
        })
        .collect();
    taken.sort_unstable();

    let mut best: Option<(u64, u64)> = None; // (distance, address)
    let mut consider = |free_start: u64, free_end: u64| {
        let a = match align_up(free_start.max(window_lo)) {
            Some(a) => a,
            None => return,
        };
        let b = align_down(free_end.min(window_hi));
        if b <= a || b - a < size {
            return;
        }
        let (addr, dist) = if b <= near_start {
            // Entirely below: take the top of the free range.
            (b - size, near_start - b)
        } else if a >= near_end {
            // Entirely above: take the bottom.
            (a, a - near_end)
        } else {
            // The free range overlaps the near range itself (it is not mapped):
            // start as close to near_start as possible.
            (align_down(near_start).clamp(a, b - size), 0)
        };
        if best.is_none_or(|(d, x)| (dist, addr) < (d, x)) {
            best = Some((dist, addr));
        }
    };

    let mut cursor = 0u64;
    for &(start, end) in &taken {
        if start > cursor {
            consider(cursor, start);
        }
        cursor = cursor.max(end);
    }
    consider(cursor, u64::MAX);
    best.map(|(_, addr)| addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(start: u64, end: u64, path: Option<&str>) -> Mapping {
        Mapping {
            start,
            end,
            perms: "r-xp".into(),
            offset: 0,
            dev: "00:00".into(),
            inode: 0,
            path: path.map(str::to_string),
        }
    }

    fn overlaps(maps: &[Mapping], addr: u64, size: u64) -> bool {
        maps.iter().any(|m| addr < m.end && m.start < addr + size)
    }

    fn reachable(addr: u64, size: u64, ns: u64, ne: u64) -> bool {
        let far = (addr + size - 1).abs_diff(ns).max(addr.abs_diff(ne - 1));
        far <= REL32_REACH
    }

    #[test]
    fn picks_the_closest_adjacent_gap() {
        let maps = vec![
            map(0x5555_0000_0000, 0x5555_0001_0000, Some("/bin/prog")),
            map(0x5555_0001_0000, 0x5555_0002_0000, Some("/bin/prog")),
        ];
        let g = find_gap_near(&maps, 0x5555_0001_0000, 0x5555_0002_0000, 0x3000).unwrap();
        assert_eq!(g % PAGE_SIZE, 0);
        assert!(!overlaps(&maps, g, 0x3000));
        // Adjacent above the text (distance 0) beats below the header (0x10000 away).
        assert_eq!(g, 0x5555_0002_0000);
    }

    #[test]
    fn tie_prefers_lower_address() {
        let maps = vec![map(0x1000_0000, 0x1001_0000, None)];
        let g = find_gap_near(&maps, 0x1000_0000, 0x1001_0000, 0x1000).unwrap();
        assert_eq!(g, 0x0fff_f000);
    }

    #[test]
    fn size_is_rounded_to_pages() {
        let maps = vec![
            map(0x1000_0000, 0x1001_0000, None),
            // a one-page hole at 0x1001_0000 and a two-page hole at 0x1001_2000
            map(0x1001_1000, 0x1001_2000, None),
            map(0x1001_4000, 0x2000_0000, None),
            map(0x0800_0000, 0x1000_0000, None),
        ];
        assert_eq!(
            find_gap_near(&maps, 0x1000_0000, 0x1001_0000, 1),
            Some(0x1001_0000)
        );
        assert_eq!(
            find_gap_near(&maps, 0x1000_0000, 0x1001_0000, 0x1001),
            Some(0x1001_2000)
        );
    }

    #[test]
    fn respects_reach_and_never_overlaps() {
        // Everything within ±2 GiB is taken except a hole far below the reach.
        let near = 0x7f00_0000_0000u64;
        let maps = vec![
            map(near - 0x9000_0000, near + 0x9000_0000, None),
            map(0x1000_0000, near - 0xa000_0000, None),
        ];
        // The only holes: [near - 0xa000_0000, near - 0x9000_0000) is out of reach.
        assert_eq!(find_gap_near(&maps, near, near + 0x1000, 0x1000), None);

        // Now open a hole just within reach below.
        let maps = vec![
            map(near - 0x7000_0000, near + 0x9000_0000, None),
            map(0x1000_0000, near - 0x7100_0000, None),
        ];
        let g = find_gap_near(&maps, near, near + 0x1000, 0x10000).unwrap();
        assert!(reachable(g, 0x10000, near, near + 0x1000));
        assert!(!overlaps(&maps, g, 0x10000));
        assert_eq!(g, near - 0x7000_0000 - 0x10000);
    }

    #[test]
    fn reach_is_measured_from_both_ends_of_the_near_range() {
        let start = 0x4000_0000_0000u64;
        let end = start + 0x4000_0000; // a 1 GiB near range
        let maps = vec![map(start, end, None)];
        let size = 0x20_0000;
        let g = find_gap_near(&maps, start, end, size).unwrap();
        assert!(reachable(g, size, start, end));
        // A near range wider than the reach cannot work.
        assert_eq!(
            find_gap_near(&[], 0x1_0000_0000, 0x1_9000_0000, 0x1000),
            None
        );
    }

    #[test]
    fn bounds_of_user_space() {
        // Near the top of user space: the gap must end below USER_SPACE_END.
        let maps = vec![map(0x7fff_f000_0000, USER_SPACE_END, Some("[stack]"))];
        let g = find_gap_near(&maps, 0x7fff_f000_0000, USER_SPACE_END, 0x1000).unwrap();
        assert!(g + 0x1000 <= 0x7fff_f000_0000 - STACK_GUARD);
        // Near address 0: never below mmap_min_addr.
        let maps = vec![map(0x1_0000, 0x40_0000, None)];
        let g = find_gap_near(&maps, 0x1_0000, 0x40_0000, 0x1000).unwrap();
        assert_eq!(g, 0x40_0000);
        let g = find_gap_near(&[], 0, 0x1000, 0x1000).unwrap();
        assert!(g >= MMAP_MIN_ADDR);
        // vsyscall above the user range is harmless.
        let maps = vec![map(
            0xffff_ffff_ff60_0000,
            0xffff_ffff_ff60_1000,
            Some("[vsyscall]"),
        )];
        assert!(find_gap_near(&maps, 0x7f00_0000_0000, 0x7f00_0000_1000, 0x1000).is_some());
    }

    #[test]
    fn keeps_heap_room() {
        let maps = vec![
            map(0x5555_0000_0000, 0x5555_0000_4000, Some("/bin/p")),
            map(0x5555_0000_4000, 0x5555_0100_0000, Some("[heap]")),
            map(0x5554_0000_0000, 0x5555_0000_0000, None),
        ];
        let g = find_gap_near(&maps, 0x5555_0000_0000, 0x5555_0000_4000, 0x1000).unwrap();
        assert_eq!(g, 0x5555_0100_0000 + HEAP_RESERVE);
    }

    #[test]
    fn unmapped_near_range() {
        let g = find_gap_near(&[], 0x1234_5000, 0x1234_6000, 0x2000).unwrap();
        assert_eq!(g, 0x1234_5000);
        assert_eq!(find_gap_near(&[], 0x1234_5000, 0x1234_6000, 0), None);
    }

    #[test]
    fn exhaustive_small_layouts() {
        // Random-ish layouts: whatever is returned satisfies all constraints.
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..500 {
            let base = (rnd() % 0x7000_0000_0000) & !(PAGE_SIZE - 1);
            let mut maps = Vec::new();
            let mut at = base;
            for _ in 0..(rnd() % 20) {
                let len = ((rnd() % 0x4000_0000) + 1) & !(PAGE_SIZE - 1);
                let hole = (rnd() % 4) * ((rnd() % 0x1000_0000) & !(PAGE_SIZE - 1));
                maps.push(map(at + hole, at + hole + len.max(PAGE_SIZE), None));
                at += hole + len.max(PAGE_SIZE);
            }
            let near_start = base + ((rnd() % 0x1000_0000) & !(PAGE_SIZE - 1));
            let near_end = near_start + (rnd() % 0x100_0000) + 1;
            let size = (rnd() % 0x10_0000) + 1;
            if let Some(g) = find_gap_near(&maps, near_start, near_end, size) {
                let size = size.div_ceil(PAGE_SIZE) * PAGE_SIZE;
                assert_eq!(g % PAGE_SIZE, 0);
                assert!(g >= MMAP_MIN_ADDR && g + size <= USER_SPACE_END);
                assert!(!overlaps(&maps, g, size));
                assert!(reachable(g, size, near_start, near_end));
            }
        }
    }
}
