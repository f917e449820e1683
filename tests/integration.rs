//! The integration tests as one test binary: each file of tests/ is a module here, so the shared
//! helpers of tests/common are compiled and linked once instead of once per file. Test names are
//! `FILE::TEST`, so `cargo test --test integration upload::` runs the tests of tests/upload.rs.
//!
//! Every test here shares one process with the others (and runs beside them on the harness's
//! threads): none may change the process's environment, working directory, umask or signal
//! dispositions. A test that has to is its own `[[test]]` target in Cargo.toml, as tests/alloc.rs
//! is (it sets `ALSA_CONFIG_PATH` and installs a counting global allocator).

mod common;

mod alsa;
mod boards;
mod cli;
mod media;
mod mqtt;
mod notify;
mod packaging;
mod pipeline;
mod reload;
mod socket;
mod stdout;
mod transcribe;
mod upload;
