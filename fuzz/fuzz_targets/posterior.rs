//! `cargo +nightly fuzz run posterior`: laplace::fuzzing::posterior must return, never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = laplace::fuzzing::posterior(data);
});
