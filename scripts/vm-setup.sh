#!/usr/bin/env bash
# Prepares the VM test tier (docs/vm-tier.md): installs qemu and the tools that go into the
# guest's initramfs, and unpacks Debian's cloud kernel into a cache directory. The kernel
# package is downloaded and extracted with `dpkg -x`; it is never installed on the host.
# Idempotent and quiet when everything is already there; fails loudly naming the step.
#
#   ENC_VM_CACHE   cache directory (default /var/cache/enc-vm)
#
# Writes $ENC_VM_CACHE/kernel.env, read by enc_tests::vm:
#   ENC_VM_KERNEL_VERSION=6.1.0-NN-cloud-amd64
#   ENC_VM_VMLINUZ=<cache>/<version>/root/boot/vmlinuz-<version>
#   ENC_VM_MODULES=<cache>/<version>/root/lib/modules/<version>
set -euo pipefail

cache="${ENC_VM_CACHE:-/var/cache/enc-vm}"

fail() {
    echo "vm-setup: $*" >&2
    exit 1
}

if [ "$(id -u)" -ne 0 ]; then
    fail "run as root (installs packages, writes ${cache})"
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Runs a command with its output held back; shows it only when the command fails.
quiet() {
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        fail "\`$*\` failed"
    fi
}
updated=0
apt_update() {
    if [ "$updated" -eq 0 ]; then
        quiet apt-get update -qq
        updated=1
    fi
}

# Host tools: qemu to boot the guest; depmod for the unpacked modules; strip for the
# project's binaries; the rest are copied into the guest's initramfs.
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' \
    || need+=(busybox-static)
command -v wg >/dev/null || need+=(wireguard-tools)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v ip >/dev/null || need+=(iproute2)
command -v tcpdump >/dev/null || need+=(tcpdump)
command -v ping >/dev/null || need+=(iputils-ping)
command -v sysctl >/dev/null || need+=(procps)
command -v depmod >/dev/null || need+=(kmod)
command -v strip >/dev/null || need+=(binutils)
if [ "${#need[@]}" -gt 0 ]; then
    echo "vm-setup: installing ${need[*]}"
    apt_update
    quiet apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# The guest runs busybox without a loader: it must be the static build.
if [[ "$(ldd /bin/busybox 2>&1 || true)" != *"not a dynamic executable"* ]]; then
    fail "/bin/busybox is not statically linked (is busybox-static installed?)"
fi

# The kernel: the ABI that linux-image-cloud-amd64 currently depends on.
resolve_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9].*-cloud-amd64$/ { print $2; exit }'
}
pkg=$(resolve_pkg)
if [ -z "$pkg" ]; then
    apt_update
    pkg=$(resolve_pkg)
fi
[ -n "$pkg" ] || fail "cannot resolve the kernel package: \`apt-cache depends linux-image-cloud-amd64\` names no linux-image-*-cloud-amd64"
version=${pkg#linux-image-}

mkdir -p "$cache" || fail "cannot create ${cache}"
dir="$cache/$version"
root="$dir/root"
vmlinuz="$root/boot/vmlinuz-$version"
modules="$root/lib/modules/$version"

if [ ! -f "$dir/.ready" ]; then
    mkdir -p "$dir"
    deb=$(ls "$dir"/"${pkg}"_*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$deb" ]; then
        echo "vm-setup: downloading ${pkg}"
        apt_update
        # As root into a root-owned directory: no _apt sandbox user.
        (cd "$dir" && quiet apt-get download -qq -o APT::Sandbox::User=root "$pkg")
        deb=$(ls "$dir"/"${pkg}"_*.deb 2>/dev/null | head -n1 || true)
        [ -n "$deb" ] || fail "apt-get download ${pkg} left no .deb in ${dir}"
    fi
    rm -rf "$root"
    quiet dpkg -x "$deb" "$root"
    [ -f "$vmlinuz" ] || fail "${deb} holds no ${vmlinuz#"$root"}"
    [ -d "$modules" ] || fail "${deb} holds no ${modules#"$root"}"
    quiet depmod -b "$root" "$version"
    [ -s "$modules/modules.dep" ] || fail "depmod wrote no ${modules}/modules.dep"
    touch "$dir/.ready"
fi

env_file="$cache/kernel.env"
want="ENC_VM_KERNEL_VERSION=$version
ENC_VM_VMLINUZ=$vmlinuz
ENC_VM_MODULES=$modules"
if [ "$(cat "$env_file" 2>/dev/null)" != "$want" ]; then
    printf '%s\n' "$want" >"$env_file" || fail "cannot write ${env_file}"
    echo "vm-setup: kernel ${version} ready: ${vmlinuz} (${env_file})"
fi
