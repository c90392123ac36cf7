//! `cargo +nightly fuzz run npy`: laplace::fuzzing::npy must return, never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = laplace::fuzzing::npy(data);
});
