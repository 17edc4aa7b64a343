#!/usr/bin/env bash
# Install the Debian packages the test suite needs, if they are missing. Idempotent and quiet when
# everything is present. Uses sudo when not root.
#   qemu-system-x86, qemu-utils, mmdebstrap : the QEMU test host for the Ansible roles (tests/lab)
#   postgresql                               : the shared study store for fleet tuning (tests/fleet)
#   cmake, g++                               : llama-cpp-python's build and llama-server
#   numactl                                  : NUMA placement for trials and the server
#   openssh-client                           : Ansible's connection to the test host
#   zsh                                      : the zsh completion script is loaded by a real zsh (tests/unit)
set -euo pipefail
packages=(qemu-system-x86 qemu-utils mmdebstrap e2fsprogs postgresql cmake g++ numactl openssh-client
          python3-venv ca-certificates zsh)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
