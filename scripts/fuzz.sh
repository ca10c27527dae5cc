#!/usr/bin/env bash
# Runs every fuzz target for a while (default 15 s each): a smoke run in the test command,
# or a longer hunt with a bigger number. Needs the nightly toolchain and cargo-fuzz, which
# it installs when missing.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-15}"
case "$seconds" in ''|*[!0-9]*) echo "fuzz: seconds must be a number (got '$seconds')" >&2; exit 2;; esac

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --version 0.13.2 --locked --quiet
fi
targets=$(cargo +nightly fuzz list)
for t in $targets; do
    printf 'fuzz: %-16s ' "$t"
    # Committed seeds (valid frames the fuzzer would take long to find) join the corpus.
    seeds=()
    if [ -d "seeds/$t" ]; then mkdir -p "corpus/$t"; seeds=("corpus/$t" "seeds/$t"); fi
    if ! out=$(cargo +nightly fuzz run "$t" "${seeds[@]}" -- -max_total_time="$seconds" 2>&1); then
        echo "FAILED"
        echo "$out" | tail -40
        exit 1
    fi
    echo "$out" | grep -E '^Done [0-9]+ runs' || echo "ok"
done
