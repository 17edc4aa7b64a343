"""The canary's measurement over Ansible's own connection: the packed workload driver runs with a plain
system python3 (no llamahost, no venv, no site-packages) against a real llama-server, and comes back as windows.

A local connection stands for the host here; over SSH to the QEMU lab the same command runs with become.
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

from tuner.config import RunConfig
from tuner.live.workload import make_request_mix
from tuner.rollout.measure import BUNDLED_MODULES, CanaryWorkload, measure_host, pack
from tuner.server.process import ServerProcess

pytestmark = pytest.mark.server

SYSTEM_PYTHON = "/usr/bin/python3"
WORKLOAD = CanaryWorkload(make_request_mix("chat", concurrency=2, count=3, scale=0.05), windows=2, warmup=1)


def test_the_bundle_holds_the_driver_and_the_spec_and_nothing_else(tmp_path: Path) -> None:
    bundle = pack(WORKLOAD, tmp_path / "canary.pyz")
    with zipfile.ZipFile(bundle) as archive:
        names = set(archive.namelist())
    assert names == {"__main__.py", "tuner/rollout/spec.json", *BUNDLED_MODULES}
    assert pack(WORKLOAD, tmp_path / "again.pyz").read_bytes() == bundle.read_bytes(), "same bytes every time"
    refused = subprocess.run([SYSTEM_PYTHON, "-I", "-S", str(bundle), "--url", "http://127.0.0.1:9",
                              "--health-timeout", "1"], capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2 and '"error"' in refused.stdout and "did not answer /health" in refused.stdout


def test_a_host_is_measured_over_ansible_with_the_hosts_own_python(
        llama_server_binary: Path, tiny_model_path: Path, small_config: RunConfig, tmp_path: Path) -> None:
    with ServerProcess(llama_server_binary, tiny_model_path, small_config, ctx_size=1024) as server:
        server.wait_healthy(60)
        inventory = tmp_path / "hosts.yml"
        port = int(server.base_url.rsplit(":", 1)[1])
        host_vars = {"ansible_connection": "local", "ansible_python_interpreter": SYSTEM_PYTHON,
                     "llama_server_port": port}
        inventory.write_text(yaml.safe_dump({"all": {"hosts": {"canary-host": host_vars}}}))
        bundle = pack(WORKLOAD, tmp_path / "canary.pyz")
        # root here, and no sudo on this machine: the lab host measures with become
        windows, raw = measure_host(inventory, "canary-host", host_vars, bundle,
                                    extra_args=("-e", "ansible_become=false"))
    assert len(windows.throughputs) == WORKLOAD.windows and all(t > 0 for t in windows.throughputs)
    assert windows.errors == 0 and windows.requests == WORKLOAD.windows * len(WORKLOAD.mix.requests)
    assert raw["base_url"] == f"http://127.0.0.1:{port}" and raw["workload"]["requests"] == 3
