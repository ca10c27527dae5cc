#!/usr/bin/env bash
# Benchmarks of enc (see docs/benchmarks.md). Needs root. Prints a markdown report on stdout
# (progress on stderr).
#
#   scripts/bench.sh [ARGS]            `enc-bench marking ARGS`: the eBPF marking program with
#   scripts/bench.sh marking [ARGS]    10 to 10,000 peers (BPF_PROG_TEST_RUN, and a packet
#                                      generator in namespaces beside an nftables baseline)
#   scripts/bench.sh overlay [ARGS]    `enc-bench overlay ARGS`: iperf3 throughput pod to pod for
#                                      plain veth, kernel VXLAN and every enc tunnel x encryption
#
# For example `scripts/bench.sh --json` or `scripts/bench.sh overlay --time 10 --json`.
set -euo pipefail
cd "$(dirname "$0")/.."

bench=marking
case "${1:-}" in
    marking | overlay)
        bench=$1
        shift
        ;;
esac

scripts/setup.sh
install() {
    echo "bench: installing $1" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$1" >/dev/null
}
echo "==> building (release)" >&2
case "$bench" in
    marking)
        command -v nft >/dev/null || install nftables
        cargo build --release --locked --quiet -p enc-tests --bin enc-bench
        ;;
    overlay)
        command -v iperf3 >/dev/null || install iperf3
        # The lab runs the enc-agent and encctl next to enc-bench: release builds of all three.
        cargo build --release --locked --quiet -p enc-tests --bin enc-bench \
            -p enc-agent --bin enc-agent -p encctl --bin encctl
        ;;
esac
exec target/release/enc-bench "$bench" "$@"
