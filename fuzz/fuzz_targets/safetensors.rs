//! `cargo +nightly fuzz run safetensors`: laplace::fuzzing::safetensors must return, never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = laplace::fuzzing::safetensors(data);
});
