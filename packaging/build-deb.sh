#!/bin/sh
# Builds the Debian package from this checkout:
#   target/debian/dualroute_<version>_<arch>.deb
# and prints its path as the last line. Extra arguments go to cargo-deb,
# e.g. --deb-version 0.1.1 (the package tests build an upgrade that way).
# Needs a Rust toolchain; installs cargo-deb from crates.io when missing.
set -eu
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "build-deb: installing cargo-deb (cargo install cargo-deb --locked)" >&2
    cargo install cargo-deb --locked >&2
fi

# The man page and completions in packaging/ are generated from the
# command line definition; tests/man_pages.rs fails when they drift.
cargo build --release --locked >&2
mkdir -p target/debian-assets
gzip -9nc packaging/changelog >target/debian-assets/changelog.gz
cargo deb --no-build --locked "$@" >&2

version=$(cargo metadata --no-deps --format-version 1 --locked |
    sed -n 's/.*"name":"dualroute","version":"\([^"]*\)".*/\1/p')
for arg in "$@"; do
    case "$arg" in --deb-version=*) version=${arg#--deb-version=} ;; esac
done
prev=""
for arg in "$@"; do
    [ "$prev" = "--deb-version" ] && version=$arg
    prev=$arg
done
arch=$(dpkg --print-architecture)
deb="$PWD/target/debian/dualroute_${version}_${arch}.deb"
if [ ! -f "$deb" ]; then
    echo "build-deb: cargo-deb did not produce $deb" >&2
    ls -l target/debian >&2 || true
    exit 1
fi
echo "$deb"
