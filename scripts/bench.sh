#!/usr/bin/env bash
# Benchmarks of enc (see docs/benchmarks.md). Needs root. Prints a markdown report on stdout
# (progress on stderr).
#
#   scripts/bench.sh [ARGS]            `enc-bench marking ARGS`: the eBPF marking program with
#   scripts/bench.sh marking [ARGS]    10 to 10,000 peers (BPF_PROG_TEST_RUN, and a packet
#                                      generator in namespaces beside an nftables baseline)
#   scripts/bench.sh overlay [ARGS]    `enc-bench overlay ARGS`: iperf3 throughput pod to pod for
#                                      plain veth, kernel VXLAN and every enc tunnel x encryption
#   scripts/bench.sh datapaths [ARGS]  `enc-bench datapaths ARGS`: enc's userspace WireGuard and
#                                      ESP beside veth, kernel VXLAN, boringtun-cli, wireguard-go
#                                      and strongSwan libipsec (throughput, TCP_RR, CPU s/GB)
#
# For example `scripts/bench.sh --json` or `scripts/bench.sh overlay --time 10 --json`.
set -euo pipefail
cd "$(dirname "$0")/.."

bench=marking
case "${1:-}" in
    marking | overlay | datapaths)
        bench=$1
        shift
        ;;
esac

scripts/setup.sh
updated=
install() {
    echo "bench: installing $*" >&2
    export DEBIAN_FRONTEND=noninteractive
    [ -n "$updated" ] || apt-get update -qq
    updated=1
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
# Installs what the datapath benchmark compares with. A peer that fails to install is left
# out here and reported by enc-bench as "not installed" with the reason.
install_peers() {
    command -v wg >/dev/null || install wireguard-tools || true
    command -v wireguard-go >/dev/null || install wireguard-go ||
        echo "bench: wireguard-go did not install" >&2
    if [ ! -x /usr/lib/ipsec/charon ] || [ ! -e /usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so ] ||
        [ ! -e /usr/lib/ipsec/plugins/libstrongswan-gcm.so ] || ! command -v swanctl >/dev/null; then
        # charon, the kernel-libipsec plugin (extra), AES-GCM and openssl (standard), swanctl.
        install strongswan-charon libcharon-extra-plugins libstrongswan-standard-plugins \
            strongswan-swanctl || echo "bench: strongSwan did not install" >&2
    fi
    if ! command -v boringtun-cli >/dev/null && [ ! -x /opt/boringtun-cli/bin/boringtun-cli ]; then
        echo "bench: installing boringtun-cli (cargo install, a few minutes)" >&2
        cargo install boringtun-cli --locked --quiet --root /opt/boringtun-cli ||
            echo "bench: boringtun-cli did not build" >&2
    fi
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
    datapaths)
        command -v iperf3 >/dev/null || install iperf3
        install_peers
        # enc-bench runs enc-bench-node (one enc datapath end) from its own directory.
        cargo build --release --locked --quiet -p enc-tests --bin enc-bench \
            -p enc-bench-node --bin enc-bench-node
        ;;
esac
exec target/release/enc-bench "$bench" "$@"
