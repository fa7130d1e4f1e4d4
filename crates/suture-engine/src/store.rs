//! Where the [`Record`] lives: a private mapping inside the target, named
//! `/memfd:suture-state` in `/proc/PID/maps`, holding two record slots and
//! a header that says which one is current. A new record goes into the
//! other slot with its length and checksum, and only then is the one word
//! that selects the slot flipped, so a reader (or a command recovering after
//! suture was killed) always finds a complete record. The mapping is
//! private, so a child forked by the target gets a copy of its own.

use crate::memory::{create_named_mapping, PROT_RW};
use crate::record::{Record, RECORD_VERSION};
use crate::Error;
use suture_process::{Hijack, Mapping, Process};

/// memfd name of the state mapping.
pub const STATE_NAME: &str = "suture-state";
const MAGIC: &[u8; 8] = b"SUTURE01";
const HEADER: u64 = 4096;
const SLOT: u64 = 16 << 20;
/// Size of the whole state mapping (pages are only used once written).
pub const STATE_SIZE: u64 = HEADER + 2 * SLOT;

fn is_state_mapping(m: &Mapping) -> bool {
    m.path
        .as_deref()
        .is_some_and(|p| p.starts_with(&format!("/memfd:{STATE_NAME}")))
}

/// The state mapping of a process, if suture ever touched it.
pub fn find_store(maps: &[Mapping]) -> Option<u64> {
    maps.iter()
        .find(|m| is_state_mapping(m) && m.end - m.start >= STATE_SIZE)
        .map(|m| m.start)
}

fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Read the current record of the store at `base`.
pub fn read(proc: &Process, base: u64) -> Result<Record, Error> {
    let header = proc.read_mem(base, 64)?;
    if &header[..8] != MAGIC {
        // Created but never written (suture was stopped in between).
        return Ok(Record::new());
    }
    let current = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize & 1;
    let mut last_err = None;
    for slot in [current, 1 - current] {
        let h = &header[16 + slot * 24..16 + slot * 24 + 24];
        let len = u64::from_le_bytes(h[8..16].try_into().unwrap());
        let sum = u64::from_le_bytes(h[16..24].try_into().unwrap());
        if len == 0 || len > SLOT {
            continue;
        }
        let data = proc.read_mem(base + HEADER + slot as u64 * SLOT, len as usize)?;
        if fnv1a(&data) != sum {
            last_err = Some("checksum mismatch");
            continue;
        }
        let rec: Record = serde_json::from_slice(&data)
            .map_err(|e| Error::CorruptState(format!("cannot decode the record: {e}")))?;
        if rec.version != RECORD_VERSION {
            return Err(Error::CorruptState(format!(
                "record version {} was written by another suture version (this one reads {RECORD_VERSION})",
                rec.version
            )));
        }
        rec.model
            .check_invariants()
            .map_err(|e| Error::CorruptState(format!("inconsistent record: {e}")))?;
        return Ok(rec);
    }
    match last_err {
        Some(e) => Err(Error::CorruptState(e.into())),
        None => Ok(Record::new()),
    }
}

/// Write `rec` as the new current record.
pub fn write(proc: &Process, base: u64, rec: &Record) -> Result<(), Error> {
    let data = serde_json::to_vec(rec).expect("record serialises");
    if data.len() as u64 > SLOT {
        return Err(Error::CorruptState(format!(
            "the record ({} bytes) exceeds the state slot",
            data.len()
        )));
    }
    let header = proc.read_mem(base, 64)?;
    let (current, generation) = if &header[..8] == MAGIC {
        let c = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize & 1;
        let g = u64::from_le_bytes(header[16 + c * 24..24 + c * 24].try_into().unwrap());
        (c, g)
    } else {
        proc.write_mem(base, MAGIC)?;
        // Slot 1 is current and empty: the first record goes to slot 0.
        proc.write_mem(base + 8, &1u32.to_le_bytes())?;
        (1, 0)
    };
    let next = 1 - current;
    proc.write_mem(base + HEADER + next as u64 * SLOT, &data)?;
    let mut h = Vec::with_capacity(24);
    h.extend_from_slice(&(generation + 1).to_le_bytes());
    h.extend_from_slice(&(data.len() as u64).to_le_bytes());
    h.extend_from_slice(&fnv1a(&data).to_le_bytes());
    proc.write_mem(base + 16 + next as u64 * 24, &h)?;
    proc.write_mem(base + 8, &(next as u32).to_le_bytes())?;
    Ok(())
}

/// Create the state mapping in the target (one hijacked thread, a few
/// system calls).
pub fn create(hijack: &mut Hijack<'_>) -> Result<u64, Error> {
    create_named_mapping(hijack, STATE_NAME, STATE_SIZE, None, PROT_RW, true)
}
