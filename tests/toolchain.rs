//! The oldest Rust that builds and tests hark, `rust-version` in Cargo.toml, is checked two ways in
//! CI: clippy's `incompatible_msrv` lint (on by default, `-D warnings`) refuses a standard-library
//! API newer than it, and the test here refuses a dependency that declares a newer one. Together
//! they stand in for a build with that old toolchain, which this machine cannot fetch.

use std::path::{Path, PathBuf};

/// `1.88`, `1.88.0` → (1, 88, 0).
fn version(s: &str) -> Option<(u32, u32, u32)> {
    let mut parts = s.split('.').map(str::parse::<u32>);
    let major = parts.next()?.ok()?;
    let minor = parts.next().unwrap_or(Ok(0)).ok()?;
    let patch = parts.next().unwrap_or(Ok(0)).ok()?;
    Some((major, minor, patch))
}

fn toml_file(path: &Path) -> toml::Table {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rust_version(manifest: &toml::Table) -> Option<&str> {
    manifest.get("package")?.get("rust-version")?.as_str()
}

/// Every crates.io package of Cargo.lock whose sources cargo has unpacked (all that a build or test
/// of hark on this platform compiled; packages for other platforms are never unpacked) declares a
/// `rust-version` no newer than hark's.
#[test]
fn no_dependency_needs_a_newer_rust_than_hark_declares() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ours = toml_file(&root.join("Cargo.toml"));
    let declared = rust_version(&ours).expect("Cargo.toml declares rust-version");
    let floor = version(declared).expect("rust-version is a version");

    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .expect("CARGO_HOME or HOME");
    let registries: Vec<PathBuf> = std::fs::read_dir(cargo_home.join("registry/src"))
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    let lock = toml_file(&root.join("Cargo.lock"));
    let packages = lock["package"]
        .as_array()
        .expect("Cargo.lock lists packages");

    let (mut checked, mut newer) = (0, Vec::new());
    for package in packages {
        let from_registry = package
            .get("source")
            .and_then(|s| s.as_str())
            .is_some_and(|s| s.starts_with("registry+"));
        if !from_registry {
            continue;
        }
        let (name, ver) = (package["name"].as_str(), package["version"].as_str());
        let (Some(name), Some(ver)) = (name, ver) else {
            panic!("Cargo.lock: a package without name or version: {package:?}");
        };
        let Some(manifest) = registries
            .iter()
            .map(|r| r.join(format!("{name}-{ver}/Cargo.toml")))
            .find(|m| m.exists())
        else {
            continue;
        };
        checked += 1;
        let needs = rust_version(&toml_file(&manifest)).map(str::to_owned);
        if let Some(needs) = needs
            && version(&needs).is_none_or(|v| v > floor)
        {
            newer.push(format!("{name} {ver} needs Rust {needs}"));
        }
    }
    // A build or test compiled well over a hundred of them; a handful means the sources were not
    // found, and the test would prove nothing.
    assert!(
        checked > 100,
        "only {checked} dependency sources found under {}",
        cargo_home.display()
    );
    assert!(
        newer.is_empty(),
        "rust-version = {declared} in Cargo.toml, but:\n{}",
        newer.join("\n")
    );
}
