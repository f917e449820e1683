#!/usr/bin/env bash
# Build and test hark for the ARM boards on an x86_64 Debian 12 machine, with Debian's own packages
# and no Docker:
#
#   scripts/cross.sh TARGET [STEP...]
#
# TARGET is aarch64 (arm64: Pi 3/4/5/Zero 2 W on 64-bit Raspberry Pi OS) or armv7 (armhf: the same
# boards, and the Pi 2, on 32-bit Raspberry Pi OS); the full Rust target names work too. STEPs, in
# the order given (default: all of them):
#
#   lint     clippy with -D warnings on every target of the crate, compiled for TARGET (32-bit
#            code paths differ: usize and C long are 32 bits on armv7)
#   build    the release binary, target/TRIPLE/release/hark
#   test     the whole test suite (unit and integration tests) for TARGET, run under qemu-user
#   deb      the Debian package, target/TRIPLE/debian/hark_VERSION-1_ARCH.deb, and a check that it
#            holds an ELF for ARCH
#   compare  hark under qemu and on this machine, on samples/hello.wav (--record-only): the
#            events must be the same, apart from times, ids and paths
#
# TARGET armv6 (arm-unknown-linux-gnueabihf: Pi Zero, Zero W, Pi 1) has one step, c: Debian has no
# Rust standard library for ARMv6, and its armhf glibc is ARMv7 code, so no ARMv6 binary can be
# made here. What can be checked is that every C part (libopus, WebRTC VAD, ring, alsa-sys's shim)
# builds with the ARMv6 flags, and that libopus and the VAD hold only ARMv6 code without NEON.
#
# What it installs (apt-get, through sudo when not root): the cross gcc and multiarch
# libasound2-dev for TARGET, qemu-user-static, and what scripts/deps.sh test installs. When the
# Rust toolchain on PATH has no standard library for TARGET (rustup cannot fetch one here), it
# unpacks Debian's rustc-web (with rustdoc and clippy) and its prebuilt standard library for
# arm64/armhf into target/cross-rust/ (not installed system-wide; the toolchain on PATH stays the
# default) and builds with that rustc. hark needs Rust 1.89 to build and test.
#
# qemu-user runs without `-L`: with it, the cross loader meets the multiarch glibc that
# libasound2:ARCH pulls in, and any program that starts a thread spins forever.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
aarch64 | aarch64-unknown-linux-gnu)
    triple=aarch64-unknown-linux-gnu arch=arm64 gnu=aarch64-linux-gnu qemu=qemu-aarch64-static
    ;;
armv7 | armv7-unknown-linux-gnueabihf)
    triple=armv7-unknown-linux-gnueabihf arch=armhf gnu=arm-linux-gnueabihf qemu=qemu-arm-static
    ;;
armv6 | arm-unknown-linux-gnueabihf)
    triple=arm-unknown-linux-gnueabihf arch=armhf gnu=arm-linux-gnueabihf qemu=qemu-arm-static
    ;;
*)
    echo "usage: scripts/cross.sh aarch64|armv7 [lint|build|test|deb|compare]..." >&2
    echo "       scripts/cross.sh armv6 [c]" >&2
    exit 2
    ;;
esac
shift
steps=("$@")
if [ "$triple" = arm-unknown-linux-gnueabihf ]; then
    allowed=(c)
else
    allowed=(lint build test deb compare)
fi
[ ${#steps[@]} -gt 0 ] || steps=("${allowed[@]}")
for s in "${steps[@]}"; do
    case " ${allowed[*]} " in *" $s "*) ;; *)
        echo "scripts/cross.sh: no step '$s' for $triple (${allowed[*]})" >&2
        exit 2
        ;;
    esac
done

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# --- Debian packages -------------------------------------------------------------------------
if ! grep -qx "$arch" <<<"$(dpkg --print-foreign-architectures)"; then
    echo "adding the $arch architecture to dpkg" >&2
    $sudo dpkg --add-architecture "$arch"
fi
scripts/deps.sh test "gcc-$gnu" "libc6-dev-$arch-cross" "libasound2-dev:$arch" qemu-user-static file
# One target directory for every cargo call below, also the packaging test's cargo deb.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
target_dir="$CARGO_TARGET_DIR"

# --- Rust for TARGET ---------------------------------------------------------------------------
# The toolchain on PATH when it has TARGET's standard library (rustup target add), else Debian's.
# (ARMv6's step runs only build scripts, which are built for this machine.)
clippy=(cargo clippy)
libdir="$(rustc --print target-libdir --target "$triple" 2>/dev/null || true)"
if [ "$triple" != arm-unknown-linux-gnueabihf ] &&
    { [ -z "$libdir" ] || ! ls "$libdir"/libstd-*.rlib >/dev/null 2>&1; }; then
    rust_version="$(apt-cache policy rustc-web | awk '/Candidate:/ { print $2 }')"
    if [ -z "$rust_version" ] || [ "$rust_version" = "(none)" ] ||
        dpkg --compare-versions "$rust_version" lt 1.89; then
        echo "no Rust standard library for $triple: rustup target add $triple, or enable" \
            "bookworm-security for Debian's rustc-web 1.89 or later (apt offers" \
            "'${rust_version:-none}'; hark needs 1.89)" >&2
        exit 1
    fi
    root="$target_dir/cross-rust/$rust_version"
    if [ ! -e "$root/ok-$arch" ] || [ ! -x "$root/clippy" ]; then
        # The package names carry the Rust and LLVM versions: read them off the dependencies.
        std="$(apt-cache show "libstd-rust-web-dev=$rust_version" |
            sed -n 's/^Depends: .*\(libstd-rust-web-[0-9.]*\) .*/\1/p' | head -1)"
        llvm="$(apt-cache show "$std=$rust_version" | sed -n 's/^Depends: .*\(libllvm[0-9]*\).*/\1/p' |
            head -1)"
        if [ -z "$std" ] || [ -z "$llvm" ]; then
            echo "cannot tell the packages of Debian's Rust $rust_version (standard library" \
                "'$std', LLVM '$llvm') from apt-cache show libstd-rust-web-dev" >&2
            exit 1
        fi
        echo "unpacking Debian's rustc $rust_version ($std, $llvm) and its $arch standard" \
            "library into $root" >&2
        mkdir -p "$scratch/debs"
        # (apt-get download warns that it runs unsandboxed when root; that is harmless.)
        if ! (cd "$scratch/debs" && apt-get download -q=2 "rustc-web=$rust_version" \
            "rust-web-clippy=$rust_version" "libstd-rust-web-dev=$rust_version" \
            "$std=$rust_version" "$llvm" "libstd-rust-web-dev:$arch=$rust_version" \
            "$std:$arch=$rust_version" 2>"$scratch/download.log"); then
            cat "$scratch/download.log" >&2
            echo "cannot download Debian's Rust $rust_version for $arch" >&2
            exit 1
        fi
        mkdir -p "$root"
        for f in "$scratch/debs"/*.deb; do dpkg-deb -x "$f" "$root"; done
        rm -rf "$scratch/debs"
        # Wrappers that find Debian's librustc_driver and LLVM; cargo-clippy runs clippy-driver
        # from its own directory, with this environment.
        for tool in rustc rustdoc cargo-clippy; do
            cat >"$root/${tool#cargo-}" <<EOF
#!/bin/sh
LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$root/usr/bin/$tool" "\$@"
EOF
            chmod +x "$root/${tool#cargo-}"
        done
        if ! ls "$("$root/rustc" --print target-libdir --target "$triple")"/libstd-*.rlib >/dev/null; then
            echo "Debian's Rust $rust_version has no standard library for $triple" >&2
            exit 1
        fi
        touch "$root/ok-$arch"
    fi
    # rustdoc too: the doc tests are compiled for the target.
    export RUSTC="$root/rustc" RUSTDOC="$root/rustdoc"
    clippy=("$root/clippy" clippy)
fi

# --- The target's tools, for cargo, cc, cmake and pkg-config -----------------------------------
under="${triple//-/_}"
upper="$(echo "$under" | tr a-z A-Z)"
export "CARGO_TARGET_${upper}_LINKER=$gnu-gcc"
export "CARGO_TARGET_${upper}_RUNNER=$qemu"
export "CC_${under}=$gnu-gcc" "AR_${under}=$gnu-ar"
export "PKG_CONFIG_LIBDIR_${under}=/usr/lib/$gnu/pkgconfig:/usr/share/pkgconfig"
export "PKG_CONFIG_SYSROOT_DIR_${under}=/" PKG_CONFIG_ALLOW_CROSS=1
# The tests start hark through this (tests/common: hark_at).
export HARK_TEST_RUNNER="$qemu"

# hark for TARGET (under qemu) and for this machine on the same recordings, --record-only: the
# events must be the same but for wall-clock times, utterance ids, paths and byte counts (the Opus
# encoder's float code differs between SIMD flavours, so the Ogg files differ in their last bits),
# and every Ogg must be a valid Opus stream (opusinfo).
compare() {
    local arm="$1" work="$scratch/compare"
    [ -x "$arm" ] || { echo "$arm is missing: run the build step first" >&2; exit 1; }
    # This machine's hark with the toolchain on PATH: the x86_64 suite's build, not a second one.
    env -u RUSTC -u RUSTDOC cargo build --locked --quiet
    mkdir -p "$work"
    cp samples/hello.wav "$work/hello.wav"
    # The same speech at 44.1 kHz stereo, through the resampler and the channel pick.
    sox -D samples/hello.wav -r 44100 -c 2 "$work/hello-44k-stereo.wav"
    local input side
    for input in hello.wav hello-44k-stereo.wav; do
        for side in host target; do
            mkdir -p "$work/$side-$input"
            local run=("$target_dir/debug/hark")
            [ "$side" = host ] || run=("$qemu" "$arm")
            local chan=()
            [ "$input" = hello.wav ] || chan=(-s capture.channel=1)
            if ! "${run[@]}" -q -i "$work/$input" --record-only "${chan[@]}" \
                -s "spool.dir=\"$work/$side-$input\"" -s output.status_interval_s=0 \
                >"$work/$side-$input.raw"; then
                echo "hark ($side: ${run[*]}) failed on $input" >&2
                exit 1
            fi
            sed -E 's/"(time|utterance|audio)":"[^"]*"/"\1":"-"/g; s/"(spool_bytes|uptime_s)":[0-9]+/"\1":0/g' \
                "$work/$side-$input.raw" >"$work/$side-$input.events"
        done
        if ! cmp -s "$work/host-$input.events" "$work/target-$input.events"; then
            echo "$triple and this machine disagree on $input:" >&2
            diff "$work/host-$input.events" "$work/target-$input.events" >&2 || true
            exit 1
        fi
        local n ogg
        n="$(grep -c '"speech_end"' "$work/target-$input.events" || true)"
        [ "$n" -gt 0 ] || { echo "no utterance in $input" >&2; exit 1; }
        for ogg in "$work/target-$input"/*.ogg; do
            opusinfo "$ogg" >/dev/null || { echo "$ogg: not a valid Opus stream" >&2; exit 1; }
        done
        echo "$input: $n utterances, the same events on $triple as on this machine"
    done
}

# The C parts for ARMv6, built by the crates' build scripts with cc-rs's flags for the target
# (-march=armv6 -marm -mfpu=vfp). Compiling the Rust crates then fails for want of a standard
# library; any other failure, and any ARMv7 or NEON code in libopus or the VAD, fails the step.
armv6_c() {
    local build="$target_dir/$triple/release/build" log="$scratch/armv6.log" lib
    rm -rf "$build"
    cargo build --release --locked --keep-going --target "$triple" >"$log" 2>&1 || true
    if grep -q 'failed to run custom build command' "$log"; then
        grep -A30 'failed to run custom build command' "$log" >&2
        exit 1
    fi
    for lib in opusic-sys-*/out/lib/libopus.a webrtc-vad-*/out/liblibfvad.a \
        alsa-sys-*/out/libtime64_control.a ring-*/out/libring_core_*_.a; do
        set -- $build/$lib
        if [ ! -f "$1" ]; then
            tail -30 "$log" >&2
            echo "$build/$lib was not built" >&2
            exit 1
        fi
    done
    for lib in $build/opusic-sys-*/out/lib/libopus.a $build/webrtc-vad-*/out/liblibfvad.a; do
        local attrs members arches
        attrs="$("$gnu-readelf" -A "$lib")"
        members="$("$gnu-ar" t "$lib")"
        arches="$(sed -n 's/^ *Tag_CPU_arch: //p' <<<"$attrs" | sort -u | tr '\n' ' ')"
        if [ "$arches" != "v6 " ] || [[ "$attrs" == *Advanced_SIMD* ]] ||
            [[ "${members,,}" == *neon* ]]; then
            echo "$lib is not plain ARMv6 code: CPU arch $arches" >&2
            exit 1
        fi
        echo "$lib: ARMv6, no NEON"
    done
    echo "ring: built for ARMv6 (it picks its ARMv7/NEON code at run time, by the CPU's features)"
}

hark_version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
deb="$target_dir/$triple/debian/hark_${hark_version}-1_$arch.deb"

for step in "${steps[@]}"; do
    echo "== scripts/cross.sh $triple $step ($("${RUSTC:-rustc}" --version))" >&2
    started=$SECONDS
    case "$step" in
    lint)
        "${clippy[@]}" --all-targets --locked --quiet --target "$triple" -- -D warnings
        ;;
    build)
        cargo build --release --locked --target "$triple"
        file -L "$target_dir/$triple/release/hark"
        ;;
    test)
        cargo test --locked --target "$triple" 2>&1
        ;;
    deb)
        # cargo deb's own build sets PKG_CONFIG_PATH_<target>, which makes cargo build everything
        # again; the binary of the build step (built now if it is not there) is the same.
        cargo build --release --locked --target "$triple"
        cargo deb --locked --no-build --target "$triple"
        got="$(dpkg-deb -f "$deb" Architecture)"
        [ "$got" = "$arch" ] || { echo "$deb: Architecture $got, not $arch" >&2; exit 1; }
        rm -rf "$scratch/deb"
        dpkg-deb -x "$deb" "$scratch/deb"
        kind="$(file -b "$scratch/deb/usr/bin/hark")"
        case "$arch:$kind" in
        arm64:*"ARM aarch64"* | armhf:*"32-bit"*"ARM, EABI5"*) ;;
        *)
            echo "$deb: usr/bin/hark is '$kind', not an $arch binary" >&2
            exit 1
            ;;
        esac
        echo "$deb: $arch, usr/bin/hark: $kind"
        ;;
    compare)
        compare "$target_dir/$triple/release/hark"
        ;;
    c)
        armv6_c
        ;;
    esac
    echo "== $triple $step: done in $((SECONDS - started)) s" >&2
done
