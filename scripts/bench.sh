#!/bin/sh
# The benchmarks of BENCHMARKS.md, with their baselines, in one run.
#
#   scripts/bench.sh            full run (several minutes; 1M accounts)
#   scripts/bench.sh --quick    smoke run (seconds): every arm once, tiny
#
# Builds the libmilter no-op from benches/noop-libmilter.c (installs
# Debian's libmilter-dev first, as root, when it is missing; and
# libmimalloc2.0, preloaded into a second no-op), then runs
#   1. the protocol arm: dualroute vs the no-op indymilter (glibc malloc
#      and mimalloc) vs libmilter;
#   2. the Postfix arm: smtp-source through a private Postfix (needs root
#      and the postfix package: scripts/test-deps.sh);
#   3. the reload arm: SIGHUP every second under load, no failures;
#   4. account loading (benches/accounts.rs): 1M, and 10M in a full run,
#      in-process and as the whole `dualroute run` (ready time, peak RSS);
#   5. the cluster arm: with and without `cluster.redis`, the Redis
#      commands a node sends, how long a change takes to reach another
#      node (needs redis-server).
# Extra arguments go to the protocol arm (e.g. --concurrency 1,8 --secs 5).
set -eu
cd "$(dirname "$0")/.."

quick=
case "${1:-}" in --quick) quick=--quick; shift ;; esac

say() { echo "bench.sh: $*" >&2; }

if [ ! -e /usr/include/libmilter/mfapi.h ]; then
    if [ "$(id -u)" != 0 ]; then
        say "libmilter-dev is missing: run as root, or apt-get install libmilter-dev"
        exit 1
    fi
    say "installing libmilter-dev (the libmilter baseline)"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libmilter-dev
fi
# The no-op once more with mimalloc preloaded: dualroute links mimalloc
# for small blocks (src/allocator.rs), and the best no-op should not be
# held back by glibc's malloc.
find_mimalloc() { ldconfig -p | sed -n 's/.*libmimalloc\.so\.2 .*=> //p' | head -n 1; }
mimalloc=$(find_mimalloc)
if [ -z "$mimalloc" ]; then
    if [ "$(id -u)" != 0 ]; then
        say "libmimalloc2.0 is missing: run as root, or apt-get install libmimalloc2.0"
        exit 1
    fi
    say "installing libmimalloc2.0 (the no-op's second allocator)"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libmimalloc2.0
    mimalloc=$(find_mimalloc)
fi
libmilter=target/release/noop-libmilter
mkdir -p target/release
cc -O2 -Wall -o "$libmilter" benches/noop-libmilter.c -lmilter -lpthread

cargo build --release --bench milter --bench accounts

say "protocol arm"
cargo bench --bench milter -- $quick --libmilter "$libmilter" --noop-preload "$mimalloc" "$@"

say "reload arm"
cargo bench --bench milter -- $quick --reload

say "Postfix arm"
cargo bench --bench milter -- $quick --postfix

# Needs redis-server (scripts/test-deps.sh installs it).
say "cluster arm"
cargo bench --bench milter -- $quick --cluster

say "account loading"
if [ -n "$quick" ]; then
    cargo bench --bench accounts -- 10000
else
    cargo bench --bench accounts -- 1000000
    cargo bench --bench accounts -- 10000000
fi
