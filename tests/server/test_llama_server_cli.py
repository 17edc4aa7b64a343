"""`llamahost server path|run` as a user runs them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tuner.server.client import complete, health
from tuner.server.process import free_port

pytestmark = pytest.mark.server
LLAMAHOST = [sys.executable, "-m", "tuner.cli"]


def test_path_prints_the_built_binary(llama_server_binary: Path) -> None:
    done = subprocess.run([*LLAMAHOST, "server", "path"], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.strip() == str(llama_server_binary)


def test_run_serves_until_terminated(llama_server_binary: Path, server_model: Path, tmp_path: Path) -> None:
    port = free_port()
    cpu = max(os.sched_getaffinity(0))
    log = tmp_path / "server.log"
    proc = subprocess.Popen([*LLAMAHOST, "server", "run", "--model", str(server_model), "--port", str(port),
                             "--ctx-size", "512", "--cpus", str(cpu), "--log-file", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # until the command says it is ready (the server answers /health a bit earlier)
            printed.append(line)
            if line.startswith("ready in"):
                break
        assert health(f"http://127.0.0.1:{port}") == 200, ("".join(printed), proc.communicate())
        result = complete(f"http://127.0.0.1:{port}", "Hi", 4, ignore_eos=True)
        assert result.timings.predicted_n == 4
        proc.send_signal(signal.SIGTERM)
        rest, _err = proc.communicate(timeout=30)
        out = "".join(printed) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143
    assert "--threads 1 --threads-batch 1" in out  # one pinned CPU: one physical core
    server_pid = int(re.search(r"\(pid (\d+)\)", out).group(1))  # type: ignore[union-attr]
    assert not Path(f"/proc/{server_pid}").exists() or "zombie" in Path(f"/proc/{server_pid}/status").read_text()
    assert "model loaded" in log.read_text()


@pytest.mark.parametrize(("extra", "message"), [
    (["--model", "/nonexistent/model.gguf"], "model file /nonexistent/model.gguf does not exist"),
    (["--cpus", "4096"], "CPUs 4096 of the CPU list 4096 are not available here"),
    (["--cache-type-v", "q8_0", "--flash-attn", "off"], "a quantized V cache needs flash attention"),
])
def test_bad_input_is_a_clear_error(llama_server_binary: Path, server_model: Path, extra: list[str],
                                    message: str) -> None:
    args = ["--model", str(server_model), *extra] if "--model" not in extra else extra
    done = subprocess.run([*LLAMAHOST, "server", "run", "--port", str(free_port()), *args],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
