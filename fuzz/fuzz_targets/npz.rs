//! `cargo +nightly fuzz run npz`: laplace::fuzzing::npz must return, never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = laplace::fuzzing::npz(data);
});
