#!/usr/bin/env bash
# Build hark and run it on the bundled sample: JSON events on stdout. With OPENAI_API_KEY set (or
# transcribe.* pointed at a server with -s), every sentence comes back as a `transcript` event;
# without a key hark says how to enable transcription and keeps the Ogg files in a fresh spool.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh build
cargo build --release --quiet
spool="$(mktemp -d -t hark-demo-XXXXXX)"
target/release/hark -i samples/hello.wav -s spool.dir="\"$spool\"" -s output.status_interval_s=0 "$@"
if [ -n "$(ls -A "$spool")" ]; then
    echo "utterances kept in $spool:" >&2
    ls -1 "$spool" >&2
fi
