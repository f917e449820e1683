#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests (real ALSA file plugin,
# espeak-ng speech, opus-tools checks).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh test
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test 2>&1
