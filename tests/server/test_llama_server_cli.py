"""`llamahost server path|run` as a user runs them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from result_support import proven_result, write_result_file

from tuner.config import RunConfig
from tuner.model.checksum import model_sha256
from tuner.server.client import complete, health
from tuner.server.process import free_port

pytestmark = pytest.mark.server
LLAMAHOST = [sys.executable, "-m", "tuner.cli"]


def test_path_prints_the_built_binary(llama_server_binary: Path) -> None:
    done = subprocess.run([*LLAMAHOST, "server", "path"], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.strip() == str(llama_server_binary)


def serve_a_request_then_terminate(*args: str) -> tuple[subprocess.Popen[str], str]:
    """Run ``llamahost server run ARGS`` until it is ready, complete one request, SIGTERM it; returns the
    process and everything it printed."""
    port = free_port()
    proc = subprocess.Popen([*LLAMAHOST, "server", "run", "--port", str(port), *args],
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
        return proc, "".join(printed) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_serves_until_terminated(llama_server_binary: Path, server_model: Path, tmp_path: Path) -> None:
    cpu = max(os.sched_getaffinity(0))
    log = tmp_path / "server.log"
    proc, out = serve_a_request_then_terminate("--model", str(server_model), "--ctx-size", "512", "--cpus", str(cpu),
                                               "--log-file", str(log))
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


def result_for(model: Path, tmp_path: Path, config: RunConfig, **model_block: str) -> Path:
    result = proven_result(config, model_sha=model_sha256((model,)))
    result["model"].update(path=str(model), **model_block)
    return write_result_file(tmp_path / "result.yaml", result)


def test_run_serves_a_result_as_it_was_measured(llama_server_binary: Path, server_model: Path, tmp_path: Path) -> None:
    cpu = max(os.sched_getaffinity(0))
    winner = RunConfig(threads=1, threads_batch=1, batch_size=256, ubatch_size=128, placement="compact", cpus=(cpu,),
                       parallel=2, ctx_size=1024)
    proc, out = serve_a_request_then_terminate("--result", str(result_for(server_model, tmp_path, winner)))
    assert proc.returncode == 143, out
    assert "serving the proven winner of study fleet-smol-tg: improved summary" in out
    command = next(line for line in out.splitlines() if line.startswith("starting:"))
    for flags in ("--threads 1 --threads-batch 1", "--batch-size 256", "--ubatch-size 128", "--parallel 2",
                  "--ctx-size 1024", f"--model {server_model}"):
        assert flags in command, command


@pytest.mark.parametrize(("extra", "message"), [
    (["--threads", "2"], "--result sets the run configuration, and --threads would change it"),
    (["--ctx-size", "4096"], "measured with a context of 1024 tokens"),
    (["--model", "OTHER"], "is not the model"),
])
def test_a_result_is_served_as_measured_or_refused(llama_server_binary: Path, server_model: Path, tmp_path: Path,
                                                   extra: list[str], message: str) -> None:
    other = tmp_path / "other.gguf"
    other.write_bytes(server_model.read_bytes()[:-1] + b"\0")  # another model file: other bytes
    result = result_for(server_model, tmp_path, RunConfig(threads=1, threads_batch=1, ctx_size=1024))
    args = [str(other) if arg == "OTHER" else arg for arg in extra]
    done = subprocess.run([*LLAMAHOST, "server", "run", "--port", str(free_port()), "--result", str(result), *args],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "starting:" not in done.stdout
