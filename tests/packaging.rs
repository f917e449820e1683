//! The systemd unit, the sysusers and tmpfiles files, the example config and the Debian package,
//! checked with the real tools: `systemd-analyze` (no running systemd needed), `systemd-sysusers`
//! and `systemd-tmpfiles` on a scratch root, `cargo deb` and `dpkg-deb`. scripts/deps.sh test
//! installs them.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const HARK: &str = env!("CARGO_BIN_EXE_hark");
/// What `systemd-analyze security` may rate the unit at most (lower is better, 10 is unsafe).
const MAX_EXPOSURE: f64 = 2.0;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/deps.sh test installs it)"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn show(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// The unit's `Key=value` lines (comments and section headers left out), in order.
fn unit_settings() -> Vec<(String, String)> {
    let unit = std::fs::read_to_string(repo("systemd/hark.service")).unwrap();
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("Key=value");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    // verify wants ExecStart's binary to exist: a copy of the unit runs the one cargo built.
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(repo("systemd/hark.service")).unwrap();
    assert!(unit.contains("\nExecStart=/usr/bin/hark "));
    let unit = unit.replace(
        "\nExecStart=/usr/bin/hark ",
        &format!("\nExecStart={HARK} "),
    );
    let path = dir.path().join("hark.service");
    std::fs::write(&path, unit).unwrap();
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    assert!(out.status.success(), "{}", show(&out));
    // Anything said is a problem: systemd only warns about a misspelt or invalid setting.
    assert_eq!(text(&out.stderr).trim(), "", "{}", show(&out));
    assert_eq!(text(&out.stdout).trim(), "", "{}", show(&out));
}

#[test]
fn the_unit_is_exposed_at_most_2_0() {
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(repo("systemd/hark.service")));
    assert!(out.status.success(), "{}", show(&out));
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level for hark.service:"))
        .unwrap_or_else(|| panic!("no overall exposure line\n{}", show(&out)));
    let figure: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the figure in {line:?}"));
    eprintln!("{}", line.trim());
    assert!(figure <= MAX_EXPOSURE, "{}", stdout);
}

#[test]
fn the_unit_keeps_what_hark_relies_on() {
    let settings = unit_settings();
    let get = |key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    for (key, value) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("WatchdogSec", "30"),
        ("Restart", "on-failure"),
        ("ExecStart", "/usr/bin/hark -c /etc/hark/hark.toml"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("User", "hark"),
        ("SupplementaryGroups", "audio"),
        // spool.dir's default, output.socket's packaged value, /etc/hark.
        ("StateDirectory", "hark"),
        ("RuntimeDirectory", "hark"),
        ("ConfigurationDirectory", "hark"),
        ("LoadCredential", "api_key:/etc/hark/api_key"),
        // ALSA and the realtime capture thread (STYLE.md).
        ("PrivateDevices", "no"),
        ("DevicePolicy", "closed"),
        ("DeviceAllow", "char-alsa rw"),
        ("RestrictRealtime", "no"),
        ("ProtectSystem", "strict"),
        ("CapabilityBoundingSet", ""),
        ("SystemCallFilter", "@system-service"),
    ] {
        assert_eq!(get(key), [value], "{key}=");
    }
    let rtprio: u32 = get("LimitRTPRIO")[0].parse().unwrap();
    assert!((1..=99).contains(&rtprio));
    let families = get("RestrictAddressFamilies")[0];
    assert!(!families.contains("AF_NETLINK") && families.contains("AF_INET6"));
    // The empty fallback that keeps a missing /etc/hark/api_key from failing the unit.
    assert_eq!(get("SetCredential"), ["api_key:\\n"]);
    // The spool and the socket live in the unit's directories.
    let example = std::fs::read_to_string(repo("contrib/hark.toml")).unwrap();
    let example: toml::Table = toml::from_str(&example).unwrap();
    assert_eq!(
        example["spool"]["dir"].as_str(),
        Some("/var/lib/hark/spool")
    );
    assert_eq!(
        example["output"]["socket"].as_str(),
        Some("/run/hark/events.sock")
    );
}

#[test]
fn sysusers_and_tmpfiles_make_the_user_and_the_spool() {
    // A scratch root with Debian's audio group (base-passwd gives it gid 29).
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    std::fs::write(
        root.path().join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/bash\n",
    )
    .unwrap();
    std::fs::write(root.path().join("etc/group"), "root:x:0:\naudio:x:29:\n").unwrap();
    let out = run(Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(repo("systemd/hark.sysusers")));
    assert!(out.status.success(), "{}", show(&out));
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("hark:"))
        .unwrap_or_else(|| panic!("no hark user in\n{passwd}"));
    let fields: Vec<&str> = user.split(':').collect();
    assert_eq!(fields[5], "/var/lib/hark", "{user}");
    assert!(fields[6].ends_with("nologin"), "{user}");
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid > 0 && uid < 1000, "a system user: {user}");
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    let audio = group
        .lines()
        .find(|l| l.starts_with("audio:x:29:"))
        .unwrap();
    assert!(
        audio
            .rsplit(':')
            .next()
            .unwrap()
            .split(',')
            .any(|m| m == "hark")
    );

    // Ownership needs root (CI and the development machine are); modes and paths do not.
    let out = run(Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(repo("systemd/hark.tmpfile")));
    assert!(out.status.success(), "{}", show(&out));
    use std::os::unix::fs::MetadataExt;
    for dir in ["var/lib/hark", "var/lib/hark/spool"] {
        let meta = std::fs::metadata(root.path().join(dir)).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.mode() & 0o7777, 0o750, "{dir}");
        if common::effective_ids().0 == 0 {
            assert_eq!(meta.uid(), uid, "{dir}");
        }
    }
}

/// Every dotted key of a TOML table (tables are walked, arrays of tables are leaves).
fn keys(table: &toml::Table, prefix: &str, into: &mut BTreeSet<String>) {
    for (k, v) in table {
        let key = format!("{prefix}{k}");
        match v {
            toml::Value::Table(t) => keys(t, &format!("{key}."), into),
            _ => {
                into.insert(key);
            }
        }
    }
}

#[test]
fn the_example_config_is_valid_and_sets_every_key() {
    let example = repo("contrib/hark.toml");
    let out = run(common::hark_at(HARK).arg("check-config").arg(&example));
    assert!(out.status.success(), "{}", show(&out));
    let effective: toml::Table = toml::from_str(&text(&out.stdout)).unwrap();
    let out = run(common::hark_at(HARK).args(["check-config", "-c", "/dev/null"]));
    assert!(out.status.success(), "{}", show(&out));
    let defaults: toml::Table = toml::from_str(&text(&out.stdout)).unwrap();
    let file: toml::Table = toml::from_str(&std::fs::read_to_string(&example).unwrap()).unwrap();
    let (mut want, mut have) = (BTreeSet::new(), BTreeSet::new());
    keys(&defaults, "", &mut want);
    keys(&file, "", &mut have);
    assert_eq!(have, want, "the example config names every key, no more");
    // It is the defaults, but for the event socket in the unit's RuntimeDirectory.
    let mut expected = defaults;
    expected["output"].as_table_mut().unwrap()["socket"] = "/run/hark/events.sock".into();
    assert_eq!(effective, expected);
}

/// What the .deb is built for: the architecture these tests were compiled for (x86_64 here, or
/// an ARM target that scripts/cross.sh runs under qemu-user), as a Rust target triple, a Debian
/// architecture, and the ELF header's class (1: 32-bit, 2: 64-bit) and machine.
struct DebTarget {
    triple: &'static str,
    arch: &'static str,
    elf_class: u8,
    elf_machine: u16,
}

const DEB_TARGET: DebTarget = if cfg!(target_arch = "aarch64") {
    DebTarget {
        triple: "aarch64-unknown-linux-gnu",
        arch: "arm64",
        elf_class: 2,
        elf_machine: 183, // EM_AARCH64
    }
} else if cfg!(target_arch = "arm") {
    DebTarget {
        triple: "armv7-unknown-linux-gnueabihf",
        arch: "armhf",
        elf_class: 1,
        elf_machine: 40, // EM_ARM
    }
} else if cfg!(target_arch = "x86_64") {
    DebTarget {
        triple: "x86_64-unknown-linux-gnu",
        arch: "amd64",
        elf_class: 2,
        elf_machine: 62, // EM_X86_64
    }
} else {
    panic!("the packaging test knows x86_64, aarch64 and 32-bit ARM only")
};

/// Builds the .deb from the binary cargo built for the tests (not a release build: that would
/// double the suite's build time). cargo-deb takes `target/TRIPLE/release/hark` from the target
/// directory, so a scratch one holds a copy; `--target` makes the package's architecture that of
/// the binary, as scripts/cross.sh does for the ARM packages.
fn build_deb(dir: &Path) -> PathBuf {
    let target = dir.join("target");
    let release = target.join(DEB_TARGET.triple).join("release");
    std::fs::create_dir_all(&release).unwrap();
    std::fs::copy(HARK, release.join("hark")).unwrap();
    let out = run(Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", &target)
        .args(["deb", "--no-build", "--fast", "--locked", "--target"])
        .arg(DEB_TARGET.triple)
        .arg("-o")
        .arg(dir.join("out")));
    assert!(out.status.success(), "{}", show(&out));
    let debs: Vec<PathBuf> = std::fs::read_dir(dir.join("out"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "{debs:?}");
    debs[0].clone()
}

/// The ELF header's class (32/64-bit) and machine of the file at `path`.
fn elf_kind(path: &Path) -> (u8, u16) {
    use std::io::Read;
    let mut bytes = [0u8; 20];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        bytes.starts_with(b"\x7fELF"),
        "{} is no ELF file",
        path.display()
    );
    assert_eq!(bytes[5], 1, "little-endian");
    (bytes[4], u16::from_le_bytes([bytes[18], bytes[19]]))
}

/// Like the other tools the tests need, a missing cargo-deb fails the test (nothing is skipped):
/// scripts/deps.sh test installs it.
fn require_cargo_deb() {
    let found = Command::new(env!("CARGO"))
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "cargo-deb is missing: run scripts/deps.sh test (cargo install cargo-deb --locked)"
    );
}

#[test]
fn the_deb_unpacks_to_the_expected_files() {
    require_cargo_deb();
    let dir = tempfile::tempdir().unwrap();
    let deb = build_deb(dir.path());
    let root = dir.path().join("root");
    let control = dir.path().join("control");
    let out = run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    assert!(out.status.success(), "{}", show(&out));
    let out = run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    assert!(out.status.success(), "{}", show(&out));

    let mut boards: Vec<String> = std::fs::read_dir(repo("boards"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    boards.sort();
    assert!(!boards.is_empty());
    let mut expected: Vec<(String, u32)> = vec![
        ("usr/bin/hark".into(), 0o755),
        ("usr/lib/systemd/system/hark.service".into(), 0o644),
        ("usr/lib/sysusers.d/hark.conf".into(), 0o644),
        ("usr/lib/tmpfiles.d/hark.conf".into(), 0o644),
        ("etc/hark/hark.toml".into(), 0o644),
        ("usr/share/doc/hark/README.md".into(), 0o644),
        ("usr/share/doc/hark/CHANGELOG.md".into(), 0o644),
        ("usr/share/doc/hark/copyright".into(), 0o644),
    ];
    expected.extend(
        boards
            .iter()
            .map(|b| (format!("usr/share/hark/boards/{b}"), 0o644)),
    );
    // The README's links into docs/ hold in /usr/share/doc/hark too.
    let docs = std::fs::read_dir(repo("docs")).unwrap();
    let docs: Vec<String> = docs
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".md"))
        .collect();
    assert!(docs.iter().any(|d| d == "events.md"), "{docs:?}");
    expected.extend(
        docs.iter()
            .map(|d| (format!("usr/share/doc/hark/docs/{d}"), 0o644)),
    );
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in &expected {
        let meta = std::fs::metadata(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o7777, *mode, "{path}");
    }
    // Nothing else.
    let mut files = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p.strip_prefix(&root).unwrap().display().to_string());
            }
        }
    }
    files.sort();
    let mut want: Vec<String> = expected.into_iter().map(|(p, _)| p).collect();
    want.sort();
    assert_eq!(files, want);

    // The files are the repository's.
    for (installed, source) in [
        (
            "usr/lib/systemd/system/hark.service",
            "systemd/hark.service",
        ),
        ("usr/lib/sysusers.d/hark.conf", "systemd/hark.sysusers"),
        ("usr/lib/tmpfiles.d/hark.conf", "systemd/hark.tmpfile"),
        ("etc/hark/hark.toml", "contrib/hark.toml"),
    ] {
        assert_eq!(
            std::fs::read(root.join(installed)).unwrap(),
            std::fs::read(repo(source)).unwrap(),
            "{installed}"
        );
    }
    // The packaged binary is built for the package's architecture, runs, and accepts the
    // packaged config.
    let bin = root.join("usr/bin/hark");
    assert_eq!(
        elf_kind(&bin),
        (DEB_TARGET.elf_class, DEB_TARGET.elf_machine),
        "usr/bin/hark in the {} package",
        DEB_TARGET.arch
    );
    let out = run(common::hark_at(&bin).arg("--version"));
    assert!(out.status.success(), "{}", show(&out));
    let out = run(common::hark_at(&bin)
        .arg("check-config")
        .arg(root.join("etc/hark/hark.toml")));
    assert!(out.status.success(), "{}", show(&out));

    // Control: the config is a conffile; the user exists before the unit is enabled, and the
    // unit is enabled (starts at boot) but not started by the installation.
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(
        conffiles.lines().collect::<Vec<_>>(),
        ["/etc/hark/hark.toml"]
    );
    let fields = std::fs::read_to_string(control.join("control")).unwrap();
    for want in [
        "Package: hark",
        "Section: sound",
        "Priority: optional",
        &format!("Architecture: {}\n", DEB_TARGET.arch),
        "libasound2",
    ] {
        assert!(fields.contains(want), "{want} in\n{fields}");
    }
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    let sysusers = postinst.find("systemd-sysusers").expect("sysusers");
    let tmpfiles = postinst
        .find("systemd-tmpfiles --create")
        .expect("tmpfiles");
    let enable = postinst
        .find("deb-systemd-helper enable hark.service")
        .expect("enable");
    assert!(sysusers < tmpfiles && tmpfiles < enable, "{postinst}");
    assert!(!postinst.contains("deb-systemd-invoke start"), "{postinst}");
    assert!(
        postinst.contains("deb-systemd-invoke try-restart hark.service"),
        "an upgrade restarts a running service: {postinst}"
    );
    let prerm = std::fs::read_to_string(control.join("prerm")).unwrap();
    assert!(
        prerm.contains("deb-systemd-invoke stop hark.service"),
        "{prerm}"
    );

    // See: issue 11 — the armhf package holds an ARMv7 binary, which a Pi Zero or Pi 1 (ARMv6)
    // cannot run: preinst refuses to install it there. `uname -m` is the kernel's word for the
    // CPU; a script on PATH stands in for it to play each board.
    let bin_dir = dir.path().join("uname-bin");
    std::fs::create_dir(&bin_dir).unwrap();
    let preinst = control.join("preinst");
    for (arch, machine, accepted) in [
        ("armhf", "armv6l", false),
        ("armhf", "armv7l", true),
        ("armhf", "aarch64", true),
        ("arm64", "aarch64", true),
        ("amd64", "x86_64", true),
    ] {
        let uname = bin_dir.join("uname");
        std::fs::write(&uname, format!("#!/bin/sh\necho {machine}\n")).unwrap();
        std::fs::set_permissions(&uname, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
        let out = run(Command::new("sh")
            .arg(&preinst)
            .arg("install")
            .env("PATH", path)
            .env("DPKG_MAINTSCRIPT_ARCH", arch));
        assert_eq!(
            out.status.success(),
            accepted,
            "{arch} on {machine}: {}",
            show(&out)
        );
        if !accepted {
            assert!(
                text(&out.stderr).contains("needs an ARMv7 CPU or later, and this one is armv6l"),
                "{}",
                show(&out)
            );
        }
    }
}

#[test]
fn help_names_every_option_of_the_design() {
    // `hark --help` stands in for a man page: every option, the files, signals and exit codes.
    let help = |args: &[&str]| {
        let out = run(common::hark_at(HARK).args(args));
        assert!(out.status.success(), "{}", show(&out));
        text(&out.stdout)
    };
    let common = ["--config", "--set", "--verbose", "--quiet", "--help"];
    let top = help(&["--help"]);
    for want in common.iter().chain(&[
        "--input",
        "--device",
        "--record-only",
        "--pace",
        "--version",
        "run",
        "upload",
        "check-config",
        "devices",
        "Exit codes: 0 ok, 2 usage, 78 bad config, 69 audio device unavailable, 1 other",
        "/etc/hark/hark.toml",
        "SIGHUP",
    ]) {
        assert!(top.contains(want), "{want} in hark --help:\n{top}");
    }
    for (sub, own) in [
        (
            "run",
            &["--input", "--device", "--record-only", "--pace"][..],
        ),
        ("upload", &[][..]),
        ("check-config", &["[FILE]"][..]),
        ("devices", &["--device"][..]),
    ] {
        let text = help(&[sub, "--help"]);
        for want in common.iter().chain(own) {
            assert!(text.contains(want), "{want} in hark {sub} --help:\n{text}");
        }
    }
}
