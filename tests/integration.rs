//! The integration tests as one test binary: each file of tests/ is a module here, so the shared
//! helpers of tests/common are compiled and linked once instead of once per file. Test names are
//! `FILE::TEST`, so `cargo test --test integration upload::` runs the tests of tests/upload.rs.
//!
//! Every test here shares one process with the others (and runs beside them on the harness's
//! threads): none may change the process's environment, working directory, umask or signal
//! dispositions. A test that has to is its own `[[test]]` target in Cargo.toml, as tests/alloc.rs
//! is (it sets `ALSA_CONFIG_PATH` and installs a counting global allocator). The one test of this
//! file checks that layout: with `autotests = false`, a file added to tests/ and declared nowhere
//! would never be compiled.

// The 80-line limit is for src/: a test or a bench is one scenario, read from top to bottom.
#![allow(clippy::too_many_lines)]

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
mod toolchain;
mod transcribe;
mod upload;

/// Every file and directory of tests/ is built: a module declared here, or the path of a `[[test]]`
/// target in Cargo.toml. Cargo would silently skip any other (`autotests = false`).
#[test]
fn every_file_of_tests_is_a_module_here_or_a_test_target() {
    use std::collections::BTreeSet;
    use std::path::Path;

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let modules: BTreeSet<&str> = include_str!("integration.rs")
        .lines()
        .filter_map(|line| line.strip_prefix("mod ")?.strip_suffix(';'))
        .collect();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("read Cargo.toml");
    let manifest: toml::Table = toml::from_str(&manifest).expect("parse Cargo.toml");
    let targets: Vec<&str> = manifest
        .get("test")
        .and_then(|t| t.as_array())
        .expect("Cargo.toml has [[test]] targets")
        .iter()
        .filter_map(|t| t.get("path")?.as_str())
        .collect();
    assert!(targets.contains(&"tests/integration.rs"), "{targets:?}");

    let mut unbuilt = Vec::new();
    for entry in std::fs::read_dir(root.join("tests")).expect("read tests/") {
        let path = entry.expect("read tests/").path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            unbuilt.push(path.display().to_string());
            continue;
        };
        let module = if path.is_dir() {
            name
        } else if let Some(stem) = name.strip_suffix(".rs") {
            stem
        } else {
            continue;
        };
        let rel = format!("tests/{name}");
        let built = modules.contains(module)
            || targets
                .iter()
                .any(|t| *t == rel || t.starts_with(&format!("{rel}/")));
        if !built {
            unbuilt.push(rel);
        }
    }
    assert!(
        unbuilt.is_empty(),
        "{unbuilt:?}: neither a `mod` in tests/integration.rs nor a [[test]] path in Cargo.toml, \
         so cargo never builds them"
    );
}
