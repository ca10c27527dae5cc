#!/usr/bin/env bash
# Benchmarks the eBPF marking program: BPF_PROG_TEST_RUN with 10 to 10,000 peers, and a packet
# generator in network namespaces beside an nftables baseline (one rule per peer CIDR). Prints
# a markdown report; extra arguments go to `enc-bench marking` (for example `--json`).
# Needs root. See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if ! command -v nft >/dev/null; then
    echo "bench: installing nftables"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nftables >/dev/null
fi
echo "==> building (release)" >&2
cargo build --release --locked --quiet -p enc-tests --bin enc-bench
exec target/release/enc-bench marking "$@"
