#!/usr/bin/env bash
# Makes target/bench-data/transcribe-minute.wav if it is missing: one minute of espeak-ng speech
# (ten sentences, 1.5 s apart) over a -60 dBFS noise floor, 16 kHz mono. Shared by the scripts
# that build long recordings from it (transcribe.sh, ogg_input.sh).
# Usage: bash benches/speech-minute.sh   (needs espeak-ng and sox)
set -euo pipefail

cd "$(dirname "$0")/.."
data=target/bench-data
minute=$data/transcribe-minute.wav
mkdir -p "$data"
[ -f "$minute" ] && exit 0

. benches/tools.sh
need speech-minute.sh "espeak-ng sox" espeak-ng sox
tmp=$(mktemp -d -p target)
trap 'rm -rf -- "$tmp"' EXIT

echo "== making one minute of speech ($minute)"
i=0
parts=()
while IFS= read -r line; do
    espeak-ng -v en-us -s 160 -w "$tmp/raw$i.wav" "$line"
    sox -D "$tmp/raw$i.wav" -r 16000 -c 1 -b 16 "$tmp/part$i.wav" pad 0 1.5
    parts+=("$tmp/part$i.wav")
    i=$((i + 1))
done <<'LINES'
The kitchen lights are on and the oven is warming up.
Please lock the front door before you go to bed tonight.
Remind me to water the plants in the garden tomorrow morning.
What is the weather going to be like in Lisbon on Saturday?
Turn the radio in the living room down a little bit.
The delivery van arrived at half past three with two parcels.
Call the plumber about the leaking tap in the upstairs bathroom.
We need milk, bread, eggs and a bag of coffee beans.
The meeting has been moved to Thursday at ten in the morning.
Good night, and see you at breakfast tomorrow.
LINES
sox -D "${parts[@]}" "$tmp/speech.wav" pad 1 60 trim 0 60
sox -D -n -r 16000 -c 1 -b 16 "$tmp/noise.wav" synth 60 whitenoise vol 0.001
sox -D -m -v 1 "$tmp/speech.wav" -v 1 "$tmp/noise.wav" "$tmp/minute.wav"
mv "$tmp/minute.wav" "$minute"
