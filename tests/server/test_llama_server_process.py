"""ServerProcess with the real llama-server and the real small model: start, serve, place, fail, stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tuner.build_knobs import knobs_of
from tuner.config import RunConfig, parse_cpu_list
from tuner.errors import UserError
from tuner.live.workload import make_request_mix, run_window
from tuner.server.client import ServerRequestError, complete, health, read_metrics
from tuner.server.flags import server_flags
from tuner.server.identity import identify
from tuner.server.process import ServerProcess, ServerStartError

pytestmark = pytest.mark.server


def is_running(pid: int) -> bool:
    """True while ``pid`` is a live (not zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_running(pid):
            return True
        time.sleep(0.05)
    return False


def thread_affinities(pid: int) -> set[tuple[int, ...]]:
    """The Cpus_allowed_list of every thread of ``pid``."""
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                out.add(parse_cpu_list(line.split(":", 1)[1]))
    return out


def test_server_becomes_healthy_and_reports_timings(running_server: ServerProcess) -> None:
    assert health(running_server.base_url) == 200
    result = complete(running_server.base_url, "The capital of France is", 16, ignore_eos=True,
                      cache_prompt=False)
    timings = result.timings
    assert timings.predicted_n == 16  # ignore_eos: exactly n_predict tokens
    assert timings.prompt_n > 0 and timings.prompt_ms > 0 and timings.prompt_per_second > 0
    assert timings.predicted_ms > 0 and timings.predicted_per_second > 0
    assert result.text
    assert result.ttft_s is not None and 0 < result.ttft_s <= result.total_s
    # the client saw the first token no earlier than the server finished the prompt
    assert result.ttft_s >= timings.prompt_ms / 1000 * 0.5


def test_metrics_counters_grow_by_what_the_requests_did(running_server: ServerProcess) -> None:
    before = read_metrics(running_server.base_url)
    done = [complete(running_server.base_url, "Count to five:", 8, ignore_eos=True, cache_prompt=False)
            for _ in range(2)]
    delta = read_metrics(running_server.base_url).counter_delta(before)
    assert delta["llamacpp:tokens_predicted_total"] == sum(c.timings.predicted_n for c in done)
    assert delta["llamacpp:prompt_tokens_total"] == sum(c.timings.prompt_n for c in done)
    assert delta["llamacpp:tokens_predicted_seconds_total"] > 0


def test_every_server_thread_runs_on_the_configured_cpus(running_server: ServerProcess, last_cpu: int) -> None:
    # all threads, including those llama.cpp and OpenMP started while loading, inherited the mask
    assert thread_affinities(running_server.pid) == {(last_cpu,)}
    assert len(list(Path(f"/proc/{running_server.pid}/task").iterdir())) > 1


def test_memory_policy_is_applied_with_numactl(llama_server_binary: Path, server_model: Path,
                                               last_cpu: int) -> None:
    config = RunConfig(threads=1, threads_batch=1, cpus=(last_cpu,), placement="compact",
                       memory_policy="interleave")
    with ServerProcess(llama_server_binary, server_model, config, ctx_size=512) as server:
        server.wait_healthy(60)
        assert Path(server.command[0]).name == "numactl"
        assert server.command[1].startswith("--interleave=")
        numa_maps = Path(f"/proc/{server.pid}/numa_maps").read_text()
        assert "interleave:" in numa_maps
        assert thread_affinities(server.pid) == {(last_cpu,)}


def test_non_default_settings_are_accepted_by_the_binary(llama_server_binary: Path, server_model: Path) -> None:
    config = RunConfig(threads=1, threads_batch=2, batch_size=256, ubatch_size=64, numa="distribute",
                       load_mode="none", flash_attn="on", cache_type_k="q8_0", cache_type_v="q8_0",
                       parallel=2, cont_batching=False)
    with ServerProcess(llama_server_binary, server_model, config, ctx_size=1024) as server:
        server.wait_healthy(60)
        assert complete(server.base_url, "Hello", 4).timings.predicted_n > 0


def test_the_build_knobs_reach_the_process_and_inherited_openmp_settings_do_not(
        llama_server_binary: Path, server_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read back from /proc: ``--no-repack`` on the command line, the configuration's OMP_WAIT_POLICY in the
    environment, and nothing of the caller's OpenMP variables; the pinned build offers both knobs."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")
    server_identity = identify(llama_server_binary)
    knobs = knobs_of(server_identity.system_info, server_flags(llama_server_binary))
    assert knobs.omp_wait_policy and knobs.repack, (knobs, server_identity.system_info)
    for config, expected in [(RunConfig(threads=1, threads_batch=1, repack=False, omp_wait_policy="active"), "ACTIVE"),
                             (RunConfig(threads=1, threads_batch=1), None)]:
        with ServerProcess(llama_server_binary, server_model, config, ctx_size=512) as server:
            server.wait_healthy(60)
            argv = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
            environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
                           if b"=" in item)
            assert (b"--no-repack" in argv) == (not config.repack)
            assert environ.get(b"OMP_WAIT_POLICY") == (expected.encode() if expected else None)
            assert b"GOMP_SPINCOUNT" not in environ
            assert complete(server.base_url, "Hello", 4).timings.predicted_n > 0


def test_strict_placement_puts_each_compute_thread_on_its_own_cpu(llama_server_binary: Path,
                                                                 server_model: Path) -> None:
    """Without --cpu-strict every thread may move within the process's CPUs; with it, llama.cpp pins its
    compute threads one CPU each (read back from /proc/PID/task/*/status)."""
    allowed = tuple(sorted(os.sched_getaffinity(0)))[:2]
    if len(allowed) < 2:
        pytest.skip("strict placement needs two CPUs this process may use")
    for strict in (False, True):
        config = RunConfig(threads=2, threads_batch=2, cpus=allowed, placement="compact", cpu_strict=strict)
        with ServerProcess(llama_server_binary, server_model, config, ctx_size=512) as server:
            server.wait_healthy(60)
            assert complete(server.base_url, "Hello", 4).timings.predicted_n > 0  # the compute threads exist
            singles = {cpus for cpus in thread_affinities(server.pid) if len(cpus) == 1}
            assert singles == ({(allowed[0],), (allowed[1],)} if strict else set()), thread_affinities(server.pid)


def test_api_key_from_file_is_required_and_kept_out_of_the_command_line(
        llama_server_binary: Path, server_model: Path, small_config: RunConfig, tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text("# the key\nsecret-test-key-123\n")
    with ServerProcess(llama_server_binary, server_model, small_config, ctx_size=512,
                       api_key_file=key_file) as server:
        server.wait_healthy(60)  # /health needs no key
        assert b"secret-test-key-123" not in Path(f"/proc/{server.pid}/cmdline").read_bytes()
        with pytest.raises(ServerRequestError, match="401"):
            complete(server.base_url, "Hello", 2)
        assert complete(server.base_url, "Hello", 2, api_key=server.api_key).timings.predicted_n > 0
        assert read_metrics(server.base_url, api_key=server.api_key).counters


def test_a_flag_value_the_server_rejects_fails_fast_with_its_log(
        llama_server_binary: Path, server_model: Path, small_config: RunConfig) -> None:
    server = ServerProcess(llama_server_binary, server_model, small_config, extra_args=("--override-kv", "bogus"))
    server.start()
    pid = server.pid
    started = time.monotonic()
    with pytest.raises(ServerStartError) as failure:
        server.wait_healthy(60)
    assert time.monotonic() - started < 30
    assert failure.value.returncode not in (None, 0)
    assert "--override-kv" in failure.value.log_tail
    assert not is_running(pid)


def test_a_broken_model_fails_with_the_load_error(llama_server_binary: Path, small_config: RunConfig,
                                                   tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 4096)
    with ServerProcess(llama_server_binary, broken, small_config) as server:
        pid = server.pid
        with pytest.raises(ServerStartError, match="exited with code"):
            server.wait_healthy(60)
    assert not is_running(pid)


def test_a_missing_model_or_unknown_flag_is_refused_before_anything_starts(
        llama_server_binary: Path, server_model: Path, small_config: RunConfig, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        ServerProcess(llama_server_binary, tmp_path / "nope.gguf", small_config).start()
    # --mlock was replaced by --load-mode in this llama.cpp
    server = ServerProcess(llama_server_binary, server_model, small_config, extra_args=("--mlock",))
    with pytest.raises(UserError, match="unknown flag '--mlock'"):
        server.start()
    assert server.poll() is None  # nothing was started


def test_deadline_passing_stops_the_server(llama_server_binary: Path, server_model: Path,
                                           small_config: RunConfig) -> None:
    server = ServerProcess(llama_server_binary, server_model, small_config).start()
    pid = server.pid
    with pytest.raises(ServerStartError, match="did not become healthy within"):
        server.wait_healthy(0.01)
    assert not is_running(pid)


def test_stop_leaves_no_process_even_when_the_caller_fails(running_server: ServerProcess) -> None:
    pid = running_server.pid
    running_server.stop()
    assert not is_running(pid)
    assert running_server.stop() is not None  # idempotent

    pids: list[int] = []
    with pytest.raises(RuntimeError, match="the caller failed"), \
            ServerProcess(running_server.binary, running_server.model, running_server.config) as server:
        server.wait_healthy(60)
        pids.append(server.pid)
        raise RuntimeError("the caller failed")
    assert not is_running(pids[0])


def test_server_dies_with_a_killed_parent(llama_server_binary: Path, server_model: Path) -> None:
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from tuner.config import RunConfig
        from tuner.server.process import ServerProcess
        server = ServerProcess(Path({str(llama_server_binary)!r}), Path({str(server_model)!r}),
                               RunConfig(threads=1, threads_batch=1), ctx_size=512).start()
        server.wait_healthy(60)
        print(server.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          check=False, env=dict(os.environ))
    assert done.returncode == -9, done.stderr
    server_pid = int(done.stdout.strip())
    gone = wait_gone(server_pid)
    if not gone:  # do not leave it running for the rest of the suite
        os.kill(server_pid, signal.SIGKILL)
    assert gone, f"llama-server {server_pid} outlived its SIGKILLed parent"


def test_a_proxy_in_the_environment_does_not_reroute_the_local_server(running_server: ServerProcess) -> None:
    # a fresh interpreter: urllib reads proxy variables once, when its first opener is built
    env = {key: value for key, value in os.environ.items() if key.lower() != "no_proxy"}
    env.update({name: "http://192.0.2.1:9" for name in ("http_proxy", "HTTP_PROXY", "all_proxy")})  # TEST-NET-1
    script = textwrap.dedent(f"""
        from tuner.server.client import complete, health, read_metrics
        url = {running_server.base_url!r}
        print(health(url), bool(read_metrics(url).counters), complete(url, "Hi", 2).timings.predicted_n)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env,
                          check=False)
    assert done.stdout.split() == ["200", "True", "2"], done.stderr


def test_a_replayed_workload_window_pays_for_every_prompt_again(running_server: ServerProcess) -> None:
    """A live measurement replays the same requests window after window. llama-server would serve those
    repeats from its prompt cache for one token each, and the prefill a production server pays for fresh
    prompts would go unmeasured: the second window must process every prompt in full, as the first did."""
    mix = make_request_mix("chat", concurrency=1, count=2, scale=0.1)
    first = run_window(running_server.base_url, mix)
    second = run_window(running_server.base_url, mix)
    assert not first.errors and not second.errors, (first.errors, second.errors)
    assert [r.prompt_tokens for r in second.records] == [r.prompt_tokens for r in first.records]
    assert min(r.prompt_tokens for r in second.records) > 5
