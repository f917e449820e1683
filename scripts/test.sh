#!/usr/bin/env bash
# The whole test suite: on this machine formatting, lints, the API docs, unit and integration
# tests (real ALSA file plugin, espeak-ng speech, opus-tools checks, mosquitto, a TLS server on
# loopback); then for aarch64 and armv7 the release build, the same unit and integration tests
# under qemu-user, the .deb and a comparison of the events with this machine's, and for ARMv6 the
# C parts (scripts/cross.sh).
#
#   scripts/test.sh          all of it
#   scripts/test.sh host     this machine's part only
#   scripts/test.sh cross    the ARM part only
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:-all}"
case "$part" in all | host | cross) ;; *)
    echo "usage: scripts/test.sh [all|host|cross]" >&2
    exit 2
    ;;
esac
if [ "$part" != cross ]; then
    scripts/deps.sh test
    cargo fmt --all -- --check
    cargo clippy --all-targets --quiet -- -D warnings
    RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --document-private-items --quiet
    cargo test --locked 2>&1
fi
if [ "$part" != host ]; then
    if [ "$(uname -m)" != x86_64 ]; then
        # On a board the part above already ran the suite natively on ARM.
        echo "scripts/test.sh: the ARM part (scripts/cross.sh) cross-builds from x86_64 only;" \
            "this machine is $(uname -m), where the tests above ran natively" >&2
        [ "$part" = all ] || exit 1
    else
        for target in aarch64 armv7 armv6; do
            scripts/cross.sh "$target"
        done
    fi
fi
