#!/usr/bin/env bash
# Performance figures for hark, in one run:
#   - the pipeline bench (cargo bench --bench pipeline): VAD alone, encoding alone, the whole
#     pipeline on a 60 s speech file, and the ratio c / (a + b);
#   - peak RSS of a 10-minute --record-only run (and of a 60 s one, to show it does not grow);
#   - the size of the stripped release binary.
# Usage: bash benches/measure.sh   (needs espeak-ng, sox, binutils; installs `time` if missing)
set -euo pipefail

cd "$(dirname "$0")/.."
data=target/bench-data
bin=target/release/hark
shm=/dev/shm
[ -d "$shm" ] || shm=${TMPDIR:-/tmp}
spool="$shm/hark-rss-$$"
tmp=$(mktemp -d)
cleanup() {
    rm -rf -- "$spool" "$tmp"
}
trap cleanup EXIT

. benches/tools.sh
need measure.sh "sox binutils" sox strip
need_gnu_time

echo "== cargo build --release"
cargo build --release

echo "== cargo bench --bench pipeline"
cargo bench --bench pipeline

# 600 s: the 60 s file ten times over.
sox "$data/speech60.wav" "$data/speech600.wav" repeat 9
echo
echo "== peak RSS of $bin --record-only (spool in $spool)"

# $1 / $2 with two decimals.
div() {
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'
}

# Peak RSS in kB of one --record-only run on $1.
peak_rss() {
    rm -rf -- "$spool"
    /usr/bin/time -v -o "$tmp/time.txt" "$bin" --record-only -i "$1" \
        -s "spool.dir=$spool" -s output.status_interval_s=0 >/dev/null 2>"$tmp/stderr.txt" || {
        echo "measure.sh: hark failed on $1:" >&2
        cat "$tmp/stderr.txt" "$tmp/time.txt" >&2
        exit 1
    }
    local kb utterances
    kb=$(awk -F': *' '/Maximum resident set size/ {print $2}' "$tmp/time.txt")
    utterances=$(find "$spool" -maxdepth 1 -name '*.json' | wc -l)
    printf '%s: %.0f s of audio, %d utterances, elapsed %s, Maximum resident set size %d kB = %s MB (%s MiB)\n' \
        "$(basename "$1")" "$(soxi -D "$1")" "$utterances" \
        "$(sed -n 's/.*Elapsed (wall clock) time.*): //p' "$tmp/time.txt")" \
        "$kb" "$(div "$kb" 1000)" "$(div "$kb" 1024)"
}
peak_rss "$data/speech600.wav"
peak_rss "$data/speech60.wav"
echo "target: <= 12 MB for the 10-minute run"

echo
echo "== release binary size"
strip -o target/hark.stripped "$bin"
bytes=$(stat -c %s target/hark.stripped)
printf '%s: %d bytes unstripped\n' "$bin" "$(stat -c %s "$bin")"
printf 'target/hark.stripped: %d bytes = %s MiB (%s MB)\n' "$bytes" "$(div "$bytes" 1048576)" "$(div "$bytes" 1000000)"
