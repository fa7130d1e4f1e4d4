//! Arbitrary bytes as a patch file: parse, lay out and link (see
//! `suture_elf::fuzzing::fuzz_patch`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| suture_elf::fuzzing::fuzz_patch(data));
