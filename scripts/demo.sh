#!/usr/bin/env bash
# Quick start: builds enc and runs a local three-node encrypted cluster in network
# namespaces, then shows `encctl status` and `encctl peers` on node-1. Pass `--keep` to leave
# the cluster running until Enter is pressed, `--nodes N` for another size.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "==> building (release)"
cargo build --release --locked --quiet --bins
exec target/release/enc-lab demo "$@"
