#!/usr/bin/env bash
# Build hark and cut the bundled sample into utterances: JSON events on stdout, Ogg files in a
# fresh spool directory (printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh build
cargo build --release --quiet
spool="$(mktemp -d -t hark-demo-XXXXXX)"
target/release/hark --record-only -i samples/hello.wav -s spool.dir="$spool" -s output.status_interval_s=0
echo "utterances written to $spool:" >&2
ls -1 "$spool" >&2
