//! Arbitrary bytes as a target's executable or shared object: parse and
//! query its symbols (see `suture_elf::fuzzing::fuzz_symbols`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| suture_elf::fuzzing::fuzz_symbols(data));
