//! `cargo +nightly fuzz run spec`: laplace::fuzzing::spec must return, never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = laplace::fuzzing::spec(data);
});
