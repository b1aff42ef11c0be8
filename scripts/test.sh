#!/bin/sh
# The whole test suite: unit, property, protocol (indymilter-test) and
# end-to-end tests against a real, private Postfix and a real, private
# Sendmail (unpacked from Debian's packages, never installed) on loopback.
# Installs what the tests need first (Debian packages, as root).
set -eu
cd "$(dirname "$0")/.."
sh scripts/test-deps.sh
sh scripts/test-deps-sendmail.sh
cargo build --release --all-targets
# tests/deb_package.rs installs these (cargo holds the build directory's
# lock while tests run, so they cannot be built from inside a test).
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
# cargo-deb removes older builds from target/debian: the upgrade goes first,
# into a directory of its own.
upgrade=$(packaging/build-deb.sh --deb-version "$version+upgrade1" | tail -n 1)
mkdir -p target/debian-upgrade
mv "$upgrade" target/debian-upgrade/
packaging/build-deb.sh
cargo test --release "$@"
# Each fuzz target of fuzz/ for a few seconds from its checked-in corpus
# (installs the nightly toolchain and cargo-fuzz first; FUZZ.md).
sh scripts/fuzz.sh 10
# The benchmarks must keep building and running: a smoke run, no timing.
sh scripts/bench.sh --quick
