#!/usr/bin/env bash
# Install the Debian packages a job needs, if they are missing. Idempotent and quiet when everything is
# present. Uses sudo when not root.
#   .ci/system-deps.sh demo : what `make demo` needs to build llama-cpp-python and place trials
#   .ci/system-deps.sh      : everything the test suite needs (the demo's packages and the rest)
#   cmake, g++                               : llama-cpp-python's build and llama-server
#   numactl                                  : NUMA placement for trials and the server
#   qemu-system-x86, qemu-utils, mmdebstrap : the QEMU test host for the Ansible roles (tests/lab)
#   postgresql                               : the shared study store for fleet tuning (tests/fleet)
#   openssh-client                           : Ansible's connection to the test host
#   zsh                                      : the zsh completion script is loaded by a real zsh (tests/unit)
set -euo pipefail
packages=(cmake g++ numactl python3-venv ca-certificates)
case "${1:-test}" in
  demo) ;;
  test) packages+=(qemu-system-x86 qemu-utils mmdebstrap e2fsprogs postgresql openssh-client zsh) ;;
  *) echo "usage: $0 [demo|test]" >&2; exit 2 ;;
esac
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
