#!/usr/bin/env bash
# `hark transcribe --record-only` on a 1-hour recording and on a 10-minute one, both made by
# repeating one minute of espeak-ng speech over a -60 dBFS noise floor: wall time as a multiple of
# real time, CPU time, peak RSS (GNU time), utterances. The output directory is on the same disk
# as target/, as a user's would be (every utterance is fsynced like the daemon's spool).
# Usage: bash benches/transcribe.sh   (needs espeak-ng and sox; installs `time` if missing)
set -euo pipefail

cd "$(dirname "$0")/.."
data=target/bench-data
bin=target/release/hark
mkdir -p "$data"
tmp=$(mktemp -d -p target)
trap 'rm -rf -- "$tmp"' EXIT

. benches/tools.sh
need transcribe.sh "espeak-ng sox" espeak-ng sox
need_gnu_time

echo "== cargo build --release"
cargo build --release

minute=$data/transcribe-minute.wav
bash benches/speech-minute.sh
sox -D "$minute" "$data/transcribe-10min.wav" repeat 9
sox -D "$minute" "$data/transcribe-1h.wav" repeat 59

# One --record-only run on $1: seconds of audio, wall and CPU time, the multiple, peak RSS.
measure() {
    local out="$tmp/out-$(basename "$1" .wav)"
    rm -rf -- "$out"
    /usr/bin/time -v -o "$tmp/time.txt" "$bin" -q transcribe --record-only "$1" -o "$out" \
        2>"$tmp/stderr.txt" || {
        echo "transcribe.sh: hark failed on $1:" >&2
        cat "$tmp/stderr.txt" "$tmp/time.txt" >&2
        exit 1
    }
    local audio wall user sys kb utterances
    audio=$(soxi -D "$1")
    wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {
        n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; print s }' "$tmp/time.txt")
    user=$(awk -F': ' '/User time/ {print $2}' "$tmp/time.txt")
    sys=$(awk -F': ' '/System time/ {print $2}' "$tmp/time.txt")
    kb=$(awk -F': *' '/Maximum resident set size/ {print $2}' "$tmp/time.txt")
    utterances=$(find "$out/utterances" -maxdepth 1 -name '*.ogg' | wc -l)
    awk -v name="$(basename "$1")" -v a="$audio" -v w="$wall" -v u="$user" -v s="$sys" \
        -v kb="$kb" -v n="$utterances" 'BEGIN {
        printf "%s: %.0f s of audio, %d utterances: wall %.2f s = %.0fx real time; CPU %.2f s (user %.2f, sys %.2f); peak RSS %d kB = %.2f MB\n",
            name, a, n, w, a / w, u + s, u, s, kb, kb / 1000 }'
}

echo
echo "== hark transcribe --record-only (target: >= 150x real time, RSS independent of length)"
measure "$data/transcribe-10min.wav"
measure "$data/transcribe-1h.wav"
