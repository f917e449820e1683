# Sourced by the bench scripts. `need SCRIPT "PACKAGES" TOOL...` stops with a message naming the
# Debian packages when a tool is missing; `need_gnu_time` installs GNU time (/usr/bin/time), whose
# -v gives the peak RSS.
need() {
    local script=$1 packages=$2
    shift 2
    for tool in "$@"; do
        command -v "$tool" >/dev/null || {
            echo "$script: $tool is missing (apt-get install $packages)" >&2
            exit 1
        }
    done
}

need_gnu_time() {
    [ -x /usr/bin/time ] && return
    echo "== installing GNU time (/usr/bin/time)" >&2
    apt-get install -y time >/dev/null || { apt-get update >/dev/null && apt-get install -y time >/dev/null; }
}
