#!/bin/sh
# The whole test suite: unit, property, protocol (indymilter-test) and
# end-to-end tests against a real, private Postfix on loopback.
# Installs what the tests need first (Debian packages, as root).
set -eu
cd "$(dirname "$0")/.."
sh scripts/test-deps.sh
cargo build --release --all-targets
cargo test --release "$@"
# The benchmarks must keep building and running: a smoke run, no timing.
sh scripts/bench.sh --quick
