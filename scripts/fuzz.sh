#!/bin/sh
# Runs every fuzz target of fuzz/ (cargo-fuzz, libFuzzer) for a bounded
# time, starting from the checked-in seeds (fuzz/corpus/TARGET); what a
# run finds goes to fuzz/corpus-run/TARGET (not checked in), a crash to
# fuzz/artifacts/TARGET and a non-zero exit. FUZZ.md says what each
# target checks and records long runs.
#
#   scripts/fuzz.sh                  # 10 s per target (what scripts/test.sh runs)
#   scripts/fuzz.sh 600              # 10 min per target
#   scripts/fuzz.sh 60 rcpt_arg      # one target
#
# Installs what it needs first, once: the nightly toolchain (libFuzzer
# needs -Zsanitizer) and cargo-fuzz.
set -eu
cd "$(dirname "$0")/.."
seconds=${1:-10}
[ $# -gt 0 ] && shift
if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
targets=${*:-$(cargo +nightly fuzz list)}
cargo +nightly fuzz build
for target in $targets; do
    mkdir -p "fuzz/corpus-run/$target"
    echo "fuzz: $target for ${seconds}s"
    # -timeout: one input taking 10 s is a hang; -max_len: RCPT
    # arguments, log lines and sessions are short, configurations too.
    cargo +nightly fuzz run "$target" "fuzz/corpus-run/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1
done
