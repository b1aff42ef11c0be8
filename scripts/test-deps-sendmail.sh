#!/bin/sh
# Unpack Debian's Sendmail 8.17 for the Sendmail end-to-end tests
# (tests/sendmail_e2e.rs) without installing it.
#
# sendmail-bin conflicts with postfix, which the other end-to-end tests
# need, so the three Sendmail packages are only downloaded (apt-get download)
# and unpacked with dpkg-deb -x into a cache directory; nothing of them
# reaches the machine's /etc, /usr or init system.  What the unpacked binary
# and the .mc build need from the system is installed as ordinary packages:
# libwrap0 (sendmail links against it; the sendmail-bin package would pull
# it in), and m4 (to build sendmail.cf from a .mc with the unpacked cf tree).
#
# Cache: $DUALROUTE_SENDMAIL_ROOT, default target/sendmail in this
# repository (`cargo clean` removes it).  Idempotent: when the unpacked tree,
# libwrap0 and m4 are present it changes nothing and does not touch apt.
set -eu
cd "$(dirname "$0")/.."

say() { printf 'test-deps-sendmail: %s\n' "$*"; }

root=${DUALROUTE_SENDMAIL_ROOT:-$PWD/target/sendmail}
packages="sendmail-bin sendmail-base sendmail-cf"

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        say "$1; run this script as root" >&2
        exit 1
    fi
}

updated=0
apt_update() {
    if [ "$updated" -eq 0 ]; then
        say "apt-get update"
        apt-get update
        updated=1
    fi
}

# Shared libraries and tools from the system.
missing=""
if ! command -v m4 >/dev/null 2>&1; then
    missing="$missing m4"
fi
if ! ldconfig -p 2>/dev/null | grep -q 'libwrap\.so\.0 '; then
    missing="$missing libwrap0"
fi
if [ -n "$missing" ]; then
    need_root "missing:$missing"
    apt_update
    say "apt-get install -y$missing"
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing
else
    say "m4 and libwrap0 are installed; nothing to do"
fi

# The unpacked packages.  A stamp written last marks a complete unpack.
stamp="$root/.unpacked"
if [ -f "$stamp" ] && [ -x "$root/usr/libexec/sendmail/sendmail" ] \
    && [ -d "$root/usr/share/sendmail/cf/m4" ]; then
    say "sendmail $(cat "$stamp") is unpacked in $root; nothing to do"
else
    need_root "sendmail is not unpacked in $root"
    apt_update
    debs=$(mktemp -d)
    trap 'rm -rf "$debs"' EXIT
    # apt-get download writes into the current directory, as the _apt user
    # when it can: let that user write there.
    chmod 777 "$debs"
    say "apt-get download $packages"
    (cd "$debs" && apt-get download $packages)
    rm -rf "$root"
    mkdir -p "$root"
    for deb in "$debs"/*.deb; do
        say "dpkg-deb -x $(basename "$deb") $root"
        dpkg-deb -x "$deb" "$root"
    done
    dpkg-deb -f "$debs"/sendmail-bin_*.deb Version >"$stamp"
    rm -rf "$debs"
    trap - EXIT
fi

# The binary must find every shared library.
if ldd "$root/usr/libexec/sendmail/sendmail" | grep 'not found' >&2; then
    say "the unpacked sendmail misses the shared libraries above" >&2
    exit 1
fi
say "sendmail $(cat "$stamp") in $root; done"
