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
cargo test --release "$@"
