//! Arbitrary bytes as a function body at an arbitrary address: plan a patch
//! site, relocate the overwritten instructions and check the copy (see
//! `suture_x86::fuzzing::fuzz_plan`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| suture_x86::fuzzing::fuzz_plan(data));
