"""``llamahost server build|path|run``: llama.cpp's own llama-server, from the pinned source.

``build`` compiles it once into the cache (``make llama-server`` does the same), ``path`` prints where
the binary is (for scripts and the Ansible role), ``run`` serves a model with a RunConfig given as
options, exactly as the tuner's live trials start it, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from tuner.config import (
    CACHE_TYPES,
    FLASH_ATTN,
    LOAD_MODES,
    MEMORY_POLICIES,
    NUMA_MODES,
    OMP_WAIT_POLICIES,
    RunConfig,
    parse_cpu_list,
)
from tuner.errors import UserError
from tuner.live.local import DEFAULT_LOCAL_PORT
from tuner.output import console, human_bytes, print_json, table
from tuner.paths import data_dir
from tuner.probe.collect import read_host
from tuner.server.build import Flavour, ServerBuild, default_jobs, ensure_server, server_binary
from tuner.server.process import DEFAULT_HEALTH_TIMEOUT_S, DEFAULT_HOST, ServerProcess

EXIT_TERMINATED = 143


def register(sub: Any) -> None:
    parser = sub.add_parser("server", help="build and run llama.cpp's llama-server (pinned llama.cpp)")
    actions = parser.add_subparsers(dest="server_command", metavar="ACTION", required=True)

    build = actions.add_parser("build", help="build llama-server from the pinned llama.cpp source (cached)")
    _add_flavour(build)
    build.add_argument("--jobs", "-j", type=int, default=None,
                       help=f"parallel compile jobs (default: every CPU, here {default_jobs()})")
    build.add_argument("--sdist", type=Path, default=None,
                       help="a local llama_cpp_python-<version>.tar.gz instead of pip (checked by sha256)")
    build.add_argument("--json", action="store_true", help="print the build manifest as JSON")
    build.set_defaults(handler=run_build)

    path = actions.add_parser("path", help="print the path of the built llama-server")
    _add_flavour(path)
    path.set_defaults(handler=run_path)

    run = actions.add_parser("run", help="serve a model with llama-server and a run configuration")
    _add_flavour(run)
    run.add_argument("--model", "-m", type=Path, help="the .gguf model file (default with --result: the result's)")
    run.add_argument("--result", type=Path, metavar="FILE",
                     help="serve the configuration a result file settled on (its proven winner, or the baseline "
                          "that stood), on the model it was measured on, instead of the options below")
    run.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    run.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    run.add_argument("--ctx-size", type=int, default=None, help="context size in tokens (default: model's)")
    run.add_argument("--api-key-file", type=Path, default=None, help="file with the API key (kept out of ps)")
    run.add_argument("--log-file", type=Path, default=None,
                     help="keep the server's log here (default: a temporary file removed on exit)")
    run.add_argument("--health-timeout", type=float, default=DEFAULT_HEALTH_TIMEOUT_S,
                     help="seconds to wait for the model to load")
    _add_config_options(run)
    run.set_defaults(handler=run_server)

    stop = actions.add_parser("stop", help="stop the server that `llamahost tune --live --local` left serving")
    stop.add_argument("--port", type=int, default=DEFAULT_LOCAL_PORT,
                      help=f"the port given to tune --live --local (default {DEFAULT_LOCAL_PORT})")
    stop.set_defaults(handler=run_stop)


def _add_flavour(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--portable", dest="flavour", action="store_const", const="portable",
                       help="x86-64-v3 build that also runs under QEMU TCG (default)")
    group.add_argument("--native", dest="flavour", action="store_const", const="native",
                       help="build for this machine's CPU only")
    parser.set_defaults(flavour="portable")


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run configuration (see RunConfig)")
    group.add_argument("--threads", "-t", type=int, default=None,
                       help="generation threads (default: physical cores of the CPUs in use)")
    group.add_argument("--threads-batch", type=int, default=None, help="prompt threads (default: --threads)")
    group.add_argument("--batch-size", type=int, default=2048)
    group.add_argument("--ubatch-size", type=int, default=512)
    group.add_argument("--cpus", default="", help="CPU list to pin to, e.g. 0-7,16-23 (default: unpinned)")
    group.add_argument("--numa", choices=NUMA_MODES, default="none")
    group.add_argument("--memory-policy", choices=MEMORY_POLICIES, default="default",
                       help="NUMA memory policy, applied with numactl")
    group.add_argument("--memory-nodes", default="", help="nodes for the memory policy (default: those of --cpus)")
    group.add_argument("--load-mode", choices=LOAD_MODES, default="auto")
    group.add_argument("--flash-attn", choices=FLASH_ATTN, default="auto")
    group.add_argument("--cache-type-k", choices=CACHE_TYPES, default="f16")
    group.add_argument("--cache-type-v", choices=CACHE_TYPES, default="f16")
    group.add_argument("--parallel", type=int, default=1, help="server slots")
    group.add_argument("--no-cont-batching", dest="cont_batching", action="store_false")
    group.add_argument("--no-repack", dest="repack", action="store_false", help="turn weight repacking off")
    group.add_argument("--omp-wait-policy", choices=OMP_WAIT_POLICIES, default="default",
                       help="OpenMP wait policy of the server's threads (default: unset, libgomp's own)")
    group.add_argument("--cpu-strict", action="store_true",
                       help="pin each thread to its own CPU of --cpus (llama.cpp's --cpu-mask and --cpu-strict 1)")


def physical_cores(cpus: set[int]) -> int:
    """How many physical cores ``cpus`` span (SMT siblings count once): llama.cpp's default thread count."""
    cores = read_host().topology.cores()
    return max(1, sum(1 for siblings in cores.values() if set(siblings) & cpus))


def config_from_args(args: argparse.Namespace) -> RunConfig:
    cpus = parse_cpu_list(args.cpus)
    threads = args.threads if args.threads is not None else physical_cores(set(cpus or os.sched_getaffinity(0)))
    return RunConfig(
        threads=threads,
        threads_batch=args.threads_batch if args.threads_batch is not None else threads,
        batch_size=args.batch_size, ubatch_size=args.ubatch_size,
        placement="compact" if cpus else "os", cpus=cpus, numa=args.numa,
        memory_policy=args.memory_policy, memory_nodes=parse_cpu_list(args.memory_nodes),
        load_mode=args.load_mode, flash_attn=args.flash_attn,
        cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v,
        parallel=args.parallel, cont_batching=args.cont_batching,
        repack=args.repack, omp_wait_policy=args.omp_wait_policy, cpu_strict=args.cpu_strict,
    ).validate()


def _show_build(build: ServerBuild) -> None:
    m = build.manifest
    rows = [
        ("binary", str(build.binary)),
        ("llama-cpp-python / llama.cpp", f"{m['llama_cpp_python_version']} / {m['llama_cpp_commit']}"),
        ("flavour", m["flavour"]),
        ("source sha256", m["source_sha256"]),
        ("built", f"{m['built_at']} in {m['build_seconds']:.0f} s with {m['jobs']} jobs ({m['compiler']})"),
        ("size", human_bytes(m["binary_bytes"])),
        ("needs packages", ", ".join(m["debian_packages"])),
        ("needs glibc / libstdc++", f"{m['glibc_required']['glibc']} / GLIBCXX {m['glibc_required']['glibcxx']}"),
    ]
    console().print(table("llama-server", ("field", "value"), rows))


def run_build(args: argparse.Namespace) -> int:
    flavour: Flavour = args.flavour
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # a killed build stops its compilers and cleans up
    stderr = console()
    stderr.file = sys.stderr
    build = ensure_server(flavour, jobs=args.jobs, sdist=args.sdist,
                          progress=lambda message: stderr.print(f"[dim]llama-server:[/dim] {message}"))
    if args.json:
        print_json({"binary": str(build.binary), **build.manifest})
    else:
        _show_build(build)
    return 0


def run_stop(args: argparse.Namespace) -> int:
    """A live --local run leaves its supervised server running (it is the deployment it tuned)."""
    from tuner.live.local import LocalServer, ServerSpec  # only here: the other actions need no live code

    state = data_dir() / "live" / f"local-{args.port}"
    control = LocalServer(state, ServerSpec(binary="", model="", host=DEFAULT_HOST, port=args.port))
    if control.supervisor_pid() is None:
        raise UserError(f"no supervised llama-server runs on port {args.port} (state {state})",
                        "pass the --port the live run used")
    control.shutdown()
    _say(f"stopped the supervised llama-server on port {args.port}")
    return 0


def run_path(args: argparse.Namespace) -> int:
    print(server_binary(args.flavour))
    return 0


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(EXIT_TERMINATED)


def config_defaults() -> dict[str, Any]:
    """The run-configuration options' defaults, from the same definitions the command line uses."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_config_options(parser)
    return vars(parser.parse_args([]))


def result_config(args: argparse.Namespace, parser_defaults: dict[str, Any]) -> tuple[RunConfig, Path, str]:
    """The configuration, model and a line saying what is served, for ``server run --result``: the result's
    ``settings.config`` rebuilt and validated (a result file is input from elsewhere), its model unless one is
    passed - and then only the same bytes. A run-configuration option beside ``--result`` is refused rather than
    silently overruling what was measured."""
    from tuner.model.checksum import model_sha256
    from tuner.model.gguf_file import inspect_model
    from tuner.result import load_result

    clashing = [f"--{name.replace('_', '-')}" for name, default in parser_defaults.items()
                if getattr(args, name) != default]
    if clashing:
        raise UserError(f"--result sets the run configuration, and {', '.join(clashing)} would change it",
                        "drop those options to serve the result as measured, or drop --result")
    result = load_result(args.result)
    model = result.model
    if not model.get("sha256"):
        raise UserError(f"{args.result} does not name its model (model.sha256)",
                        "pass a result written by `llamahost tune`, `tune --live` or `fleet finish`")
    config = result.chosen_config(origin=f"{args.result}: settings.config")
    if config.ctx_size and args.ctx_size is not None and args.ctx_size != config.ctx_size:
        raise UserError(f"{args.result} was measured with a context of {config.ctx_size} tokens, and --ctx-size "
                        f"{args.ctx_size} would change it", "drop --ctx-size to serve the result as measured")
    path = args.model or Path(str(model.get("path")))
    served = model_sha256(inspect_model(path).files)
    if served != model["sha256"]:
        raise UserError(f"{path} is not the model {args.result} was measured on (sha256 {served[:12]}..., the "
                        f"result's {str(model['sha256'])[:12]}...)", "pass that model with --model, or tune this one")
    what = "the proven winner" if result.improved else "the baseline, which no candidate beat"
    return config, path, f"serving {what} of study {result.study}: {result.summary}"


def run_server(args: argparse.Namespace) -> int:
    if args.result is not None:
        config, model, line = result_config(args, config_defaults())
        _say(line)
    elif args.model is None:
        raise UserError("server run needs a model", "pass --model FILE.gguf, or --result FILE to serve a result")
    else:
        config, model = config_from_args(args), args.model
    binary = server_binary(args.flavour)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # stop the server cleanly on `kill`, too
    with ServerProcess(binary, model, config, host=args.host, port=args.port, ctx_size=args.ctx_size,
                       api_key_file=args.api_key_file, log_path=args.log_file) as server:
        # plain, unwrapped lines: scripts read them
        _say(f"starting: {' '.join(server.command)}")
        _say(f"log: {server.log_path}")
        if server.placement is not None:
            _say(f"placement: {server.placement.describe()}")
        waited = server.wait_healthy(args.health_timeout)
        _say(f"ready in {waited:.1f} s at {server.base_url} (pid {server.pid}); Ctrl-C stops it")
        while (code := server.poll()) is None:
            time.sleep(0.5)
        _say(f"llama-server exited with code {code}")
        return 1


def _say(line: str) -> None:
    print(line, flush=True)
