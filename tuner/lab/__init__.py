"""The lab: a disposable QEMU test host with a real Debian kernel, for the Ansible roles and for people.

Kernel settings (hugepages per NUMA node, the kernel command line, SMT, systemd's CPU and memory
placement) cannot be tested on the machine that runs the tests, so the lab boots a small Debian bookworm
host under QEMU's TCG emulator with two sockets, two NUMA nodes and SMT siblings, reachable over SSH on a
loopback port only. ``llamahost lab up|down|status|ssh|inventory`` (and ``make lab-up``/``lab-down``)
drive it; the slow test tier (``tests/lab``) converges the roles on it.

Modules, pure logic apart from I/O:

* :mod:`tuner.lab.spec`: what the host is (image recipe, emulated machine), as plain data;
* :mod:`tuner.lab.recipe`: the image build commands (mmdebstrap, the customize script, mkfs.ext4);
* :mod:`tuner.lab.machine`: the QEMU command line;
* :mod:`tuner.lab.access`: SSH config, known_hosts and Ansible inventory texts;
* :mod:`tuner.lab.image`: builds and caches the base image (I/O);
* :mod:`tuner.lab.instance`: starts, watches and stops one running lab host (I/O).
"""
