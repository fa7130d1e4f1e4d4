//! Dispatch stubs built for arbitrary parameters, and the pending-table
//! helpers on arbitrary operations (see `suture_x86::fuzzing::fuzz_dispatch`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| suture_x86::fuzzing::fuzz_dispatch(data));
