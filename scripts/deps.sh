#!/usr/bin/env bash
# Install the Debian packages hark needs, only those missing.
#   scripts/deps.sh build   libasound2-dev, pkg-config, cmake, make, gcc (to build hark)
#   scripts/deps.sh test    the build set plus espeak-ng, sox, opus-tools, mosquitto and
#                           mosquitto-clients (for the tests)
set -euo pipefail
want=(libasound2-dev pkg-config cmake make gcc)
if [ "${1:-build}" = test ]; then
  want+=(espeak-ng sox opus-tools mosquitto mosquitto-clients)
fi
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing: ${missing[*]}" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
