#!/usr/bin/env bash
# Install the Debian packages hark needs, only those missing.
#   scripts/deps.sh build   libasound2-dev, pkg-config, cmake, make, gcc (to build hark)
#   scripts/deps.sh deb     the build set plus dpkg-dev, and cargo-deb 3 (`cargo install`), for
#                           `make deb`
#   scripts/deps.sh test    the build and deb sets plus espeak-ng, sox, opus-tools, lame,
#                           mosquitto, mosquitto-clients and systemd (systemd-analyze; for the
#                           tests)
#   scripts/deps.sh SET PACKAGE...
#                           the set, plus the packages named (scripts/cross.sh: the cross gcc,
#                           libasound2-dev:ARCH, qemu-user-static)
set -euo pipefail
case "${1:-build}" in build | deb | test) ;; *)
    echo "usage: scripts/deps.sh build|deb|test [PACKAGE...]" >&2
    exit 2
    ;;
esac
want=(libasound2-dev pkg-config cmake make gcc "${@:2}")
if [ "${1:-build}" = deb ] || [ "${1:-build}" = test ]; then
  want+=(dpkg-dev)
fi
if [ "${1:-build}" = test ]; then
  want+=(espeak-ng sox opus-tools lame mosquitto mosquitto-clients systemd)
fi
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ "${1:-build}" = deb ] || [ "${1:-build}" = test ]; then
  cargo deb --version 2>/dev/null | grep -q '^cargo-deb 3\.' ||
    cargo install cargo-deb --locked --version '^3.8' --quiet
fi
