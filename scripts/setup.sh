#!/usr/bin/env bash
# Installs what building and testing enc needs on a Debian machine: system tools for the
# network-namespace tests and the Rust components for the checks. Idempotent and quiet when
# everything is already there.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: run as root (installs packages; the tests create network namespaces)" >&2
    exit 1
fi

need=()
command -v ip >/dev/null || need+=(iproute2)
command -v tcpdump >/dev/null || need+=(tcpdump)
command -v ping >/dev/null || need+=(iputils-ping)
command -v sysctl >/dev/null || need+=(procps)
if [ "${#need[@]}" -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# scapy is the independent ESP peer of the interop tests.
if ! python3 -c 'import scapy' 2>/dev/null; then
    echo "setup: installing scapy (PyPI)"
    python3 -m pip install --quiet --disable-pip-version-check scapy
fi

# The Helm chart tests (deploy/tests): Helm's Go SDK as a Python package (its shared library
# is in the wheel: no helm binary, no download at run time), kubernetes-validate with the
# Kubernetes schemas bundled, pytest and PyYAML.
if ! python3 -c 'import helm_python, kubernetes_validate, pytest, yaml' 2>/dev/null; then
    echo "setup: installing helm-python-sdk, kubernetes-validate, pytest, PyYAML (PyPI)"
    python3 -m pip install --quiet --disable-pip-version-check \
        'helm-python-sdk==0.2.2' 'kubernetes-validate==1.37.0' pytest PyYAML
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install the Rust toolchain (rustup) first" >&2
    exit 1
fi
for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
        rustup component add "$component"
    fi
done

# The eBPF programs (tunnel-ebpf/ebpf) build with the nightly toolchain's rust-src and
# bpf-linker 0.10.0, the last release that links with rustc's own LLVM.
if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
    rustup component add rust-src --toolchain nightly
fi
if ! bpf-linker --version 2>/dev/null | grep -q '0\.10\.0'; then
    echo "setup: installing bpf-linker 0.10.0 (a few minutes)"
    cargo +nightly install bpf-linker --version 0.10.0 --locked --quiet
fi

# The VM tier (docs/vm-tier.md): qemu, the guest's tools and Debian's cloud kernel, unpacked
# into a cache and never installed on the host.
"$(dirname "$0")/vm-setup.sh"
