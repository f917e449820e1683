#!/usr/bin/env bash
# Peak RSS of `hark transcribe --record-only` on Ogg/Opus input of 10 minutes and of 1 hour
# (one minute of espeak-ng speech repeated with sox, encoded by opusenc with its defaults), under
# GNU time. Ogg/Opus input is read as a stream, so the hour must take no more memory than the ten
# minutes: the target is a 1-hour peak RSS within 1 MB (1000 kB) of the 10-minute one. Wall time
# and utterances are printed too. The output directory is on the same disk as target/.
# Usage: bash benches/ogg_input.sh [OTHER_BINARY...]
#   Each OTHER_BINARY (an older hark, say) is measured on the same files after
#   target/release/hark, which is built here.
# Needs espeak-ng, sox and opusenc (opus-tools); installs `time` if missing.
set -euo pipefail

cd "$(dirname "$0")/.."
data=target/bench-data
mkdir -p "$data"
tmp=$(mktemp -d -p target)
trap 'rm -rf -- "$tmp"' EXIT

. benches/tools.sh
need ogg_input.sh "sox opus-tools" sox opusenc
need_gnu_time
for other in "$@"; do
    [ -x "$other" ] || {
        echo "ogg_input.sh: $other is not an executable" >&2
        exit 1
    }
done

echo "== cargo build --release"
cargo build --release

bash benches/speech-minute.sh
minute=$data/transcribe-minute.wav
# name:repeats (sox's repeat adds that many copies after the first).
for spec in 10min:9 1h:59; do
    name=${spec%%:*}
    opus=$data/ogg-input-$name.opus
    [ -f "$opus" ] && continue
    echo "== making $opus"
    sox -D "$minute" "$tmp/$name.wav" repeat "${spec##*:}"
    opusenc --quiet "$tmp/$name.wav" "$tmp/$name.opus"
    mv "$tmp/$name.opus" "$opus"
    rm -f -- "$tmp/$name.wav"
done

# One --record-only run of binary $1 on $2; prints a line and leaves the peak RSS (kB) in $rss.
measure() {
    local out="$tmp/out"
    rm -rf -- "$out"
    /usr/bin/time -v -o "$tmp/time.txt" "$1" -q transcribe --record-only "$2" -o "$out" \
        2>"$tmp/stderr.txt" || {
        echo "ogg_input.sh: $1 failed on $2:" >&2
        cat "$tmp/stderr.txt" "$tmp/time.txt" >&2
        exit 1
    }
    local wall utterances
    rss=$(awk -F': *' '/Maximum resident set size/ {print $2}' "$tmp/time.txt")
    wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {
        n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; print s }' "$tmp/time.txt")
    utterances=$(find "$out/utterances" -maxdepth 1 -name '*.ogg' | wc -l)
    printf '%s: %d utterances, wall %.1f s, peak RSS %d kB\n' "$(basename "$2")" "$utterances" \
        "$wall" "$rss"
}

status=0
for binary in target/release/hark "$@"; do
    echo
    echo "== $binary transcribe --record-only (target: 1 h peak RSS within 1000 kB of 10 min)"
    measure "$binary" "$data/ogg-input-10min.opus"
    short=$rss
    measure "$binary" "$data/ogg-input-1h.opus"
    long=$rss
    growth=$((long - short))
    verdict="within target"
    if [ "$growth" -gt 1000 ]; then
        verdict="OVER target"
        # Only the binary built here is held to the target.
        [ "$binary" = target/release/hark ] && status=1
    fi
    echo "$binary: peak RSS 10 min $short kB, 1 h $long kB; 1 h minus 10 min: $growth kB ($verdict)"
done
exit "$status"
