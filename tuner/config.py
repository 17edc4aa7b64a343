"""One llama.cpp CPU run configuration, and its three renderings.

A :class:`RunConfig` is what a trial measures, what the result file records, and what the playbook
applies. It is rendered in exactly one place for each consumer so the three can never drift apart:

* :meth:`RunConfig.server_args`: ``llama-server`` command-line flags;
* :meth:`RunConfig.role_vars`: the ``llama_server_*`` variables of the Ansible role (host_vars);
* the trial worker reads the fields directly into llama.cpp's context and model parameters.

Values use llama.cpp's own vocabulary (``--numa distribute``, ``--load-mode mmap``, ``-fa on``) so a user
can read a result and type it into llama-server by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, get_args

from tuner import cpu_lists
from tuner.cpu_lists import MAX_CPU_ID, cpu_mask, format_cpu_list
from tuner.errors import UserError

NumaMode = Literal["none", "distribute", "isolate", "numactl"]
MemoryPolicy = Literal["default", "interleave", "bind"]
LoadMode = Literal["auto", "none", "mmap", "mlock", "mmap+mlock"]
FlashAttn = Literal["auto", "on", "off"]
Placement = Literal["os", "compact", "scatter"]
# libgomp's OMP_WAIT_POLICY for the server's OpenMP threads: "default" leaves the variable unset (libgomp
# spins a while, then sleeps), ACTIVE keeps idle threads spinning, PASSIVE puts them to sleep at once.
OmpWaitPolicy = Literal["default", "active", "passive"]

NUMA_MODES: tuple[str, ...] = get_args(NumaMode)
MEMORY_POLICIES: tuple[str, ...] = get_args(MemoryPolicy)
LOAD_MODES: tuple[str, ...] = get_args(LoadMode)
FLASH_ATTN: tuple[str, ...] = get_args(FlashAttn)
PLACEMENTS: tuple[str, ...] = get_args(Placement)
OMP_WAIT_POLICIES: tuple[str, ...] = get_args(OmpWaitPolicy)
# Every environment variable RunConfig.server_environment may set: whoever starts a trial decides each of them.
SERVER_ENVIRONMENT_NAMES: tuple[str, ...] = ("OMP_WAIT_POLICY",)
# KV cache element types llama.cpp accepts for -ctk/-ctv on CPU.
CACHE_TYPES: tuple[str, ...] = ("f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "f32")
QUANTIZED_CACHE_TYPES = frozenset({"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"})

ROLE_PREFIX = "llama_server_"
# llama-server's slots when --parallel is -1 (tools/server/server.cpp: "n_parallel is set to auto, using 4").
AUTO_SLOTS = 4
# What only a live server measures: a benchmark trial serves one sequence with its own context, so a benchmark
# result says nothing about slots, continuous batching or context size and must leave them as deployed.
LIVE_ONLY_FIELDS: tuple[str, ...] = ("parallel", "cont_batching", "ctx_size")
RunKind = Literal["benchmark", "live"]
RUN_KINDS: tuple[str, ...] = get_args(RunKind)

MAX_CTX_SIZE = 1 << 24
# Bounds on every integer setting. They are far past any real host (the kernel allows 8192 CPUs), and they keep a
# value read from a result file or a shared study store from reaching a unit file or a command line unchecked.
_INT_BOUNDS: dict[str, tuple[int, int]] = {
    "threads": (1, MAX_CPU_ID + 1), "threads_batch": (1, MAX_CPU_ID + 1),
    "batch_size": (1, 1 << 20), "ubatch_size": (1, 1 << 20),
    "parallel": (-1, 4096), "ctx_size": (0, MAX_CTX_SIZE),
}
_BOOL_FIELDS = ("smt", "cont_batching", "repack", "cpu_strict")
_CHOICE_FIELDS: dict[str, tuple[str, ...]] = {
    "placement": PLACEMENTS, "numa": NUMA_MODES, "memory_policy": MEMORY_POLICIES, "load_mode": LOAD_MODES,
    "flash_attn": FLASH_ATTN, "cache_type_k": CACHE_TYPES, "cache_type_v": CACHE_TYPES,
    "omp_wait_policy": OMP_WAIT_POLICIES,
}
_CPU_LIST_FIELDS = ("cpus", "memory_nodes")
KEY_OPTIONAL_FIELDS = frozenset({"repack", "omp_wait_policy", "cpu_strict"})
# llama.cpp reads a CPU mask of at most 128 hex digits (GGML_MAX_N_THREADS, 512 CPUs).
MAX_MASK_CPU = 511


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """Parse ``"0-3,8,10"`` (the format of /sys/.../cpulist). Empty text is the empty set."""
    try:
        return cpu_lists.parse_cpu_list(text)
    except cpu_lists.CpuListError as exc:
        raise UserError(str(exc), f"write CPU lists like '0-7,16-23', CPU ids 0 to {MAX_CPU_ID}") from None


def plain_scalar(value: Any) -> Any:
    """A YAML loader's scalar as the plain Python type it stands for (ruamel's round-trip loader gives
    ``ScalarInt``/``ScalarBoolean``/``ScalarFloat`` subclasses, which strict type checks must see through)."""
    if isinstance(value, bool) or type(value).__name__ == "ScalarBoolean":
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value


def _as_typed(name: str, value: Any) -> Any:
    """A role variable as the type :class:`RunConfig` holds: inventories often quote numbers ("8") and spell
    booleans the YAML 1.1 way ("yes"), which Ansible's argument specs accept too."""
    if name in _INT_BOUNDS and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if name in _BOOL_FIELDS and isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    return value


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def slots_of(parallel: int) -> int:
    """The server slots a --parallel value gives (-1: llama-server's automatic choice)."""
    return AUTO_SLOTS if parallel == -1 else parallel


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides how fast llama.cpp runs on a CPU host, for one model."""

    threads: int
    threads_batch: int
    batch_size: int = 2048
    ubatch_size: int = 512
    smt: bool = True  # whether SMT siblings may be used (descriptive; ``cpus`` is what is applied)
    placement: Placement = "os"
    cpus: tuple[int, ...] = ()  # affinity mask; empty = not pinned, the OS decides
    numa: NumaMode = "none"
    memory_policy: MemoryPolicy = "default"
    memory_nodes: tuple[int, ...] = ()  # nodes for interleave/bind; empty = nodes of ``cpus``
    load_mode: LoadMode = "auto"
    flash_attn: FlashAttn = "auto"
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    # What the build offers beyond the flags above (tuner.build_knobs decides whether a build has them):
    # weight repacking (``--no-repack`` turns it off), the OpenMP wait policy (an environment variable), and
    # strict placement: each of llama.cpp's threads pinned to its own CPU of ``cpus`` (``--cpu-mask``
    # and ``--cpu-strict 1``), instead of every thread free to move within them.
    repack: bool = True
    omp_wait_policy: OmpWaitPolicy = "default"
    cpu_strict: bool = False
    # Only a live server has these (overnight tuning of a deployment). parallel -1 is llama-server's
    # "auto" (4 slots sharing one unified KV cache); ctx_size 0 leaves the context size to whoever starts
    # the server (a benchmark trial or the role's own llama_server_ctx_size).
    parallel: int = 1
    cont_batching: bool = True
    ctx_size: int = 0

    def type_problems(self) -> list[str]:
        """Values of the wrong type or out of bounds, one sentence each.

        A configuration can come from a file or a study row someone else wrote, and its values end up in a
        root-owned unit file and a command line: only integers in their bounds, booleans and the named
        choices pass, so no value can carry a newline, a flag or a path."""
        out: list[str] = []
        for name, (low, high) in _INT_BOUNDS.items():
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                out.append(f"{name} must be an integer from {low} to {high} (got {value!r})")
        for name in _BOOL_FIELDS:
            if type(getattr(self, name)) is not bool:
                out.append(f"{name} must be true or false (got {getattr(self, name)!r})")
        for name, allowed in _CHOICE_FIELDS.items():
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                out.append(f"{name} must be one of {', '.join(allowed)} (got {value!r})")
        for name in _CPU_LIST_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, tuple) or any(type(v) is not int or not 0 <= v <= MAX_CPU_ID for v in value):
                out.append(f"{name} must be a list of CPU or node ids from 0 to {MAX_CPU_ID} (got {value!r})")
        return out

    def problems(self) -> list[str]:
        """Why this configuration is invalid, one sentence each; empty when it is valid."""
        out = self.type_problems()
        if out:
            return out  # the combination rules below compare values, which needs the right types
        if self.threads < 1 or self.threads_batch < 1:
            out.append("threads and threads_batch must be at least 1")
        if self.ubatch_size < 1 or self.batch_size < 1:
            out.append("batch_size and ubatch_size must be at least 1")
        if self.ubatch_size > self.batch_size:
            out.append(f"ubatch_size {self.ubatch_size} is larger than batch_size {self.batch_size}")
        if self.batch_size < (least := self.least_batch_size()):
            out.append(f"batch_size {self.batch_size} is below {least}: llama-server decodes two tokens at start, "
                       "and one per slot at once, and aborts with a smaller batch")
        if self.cpus and max(self.threads, self.threads_batch) > len(self.cpus):
            out.append(f"{max(self.threads, self.threads_batch)} threads on {len(self.cpus)} pinned CPUs "
                       "would oversubscribe them")
        if self.placement != "os" and not self.cpus:
            out.append(f"placement {self.placement!r} needs a CPU list")
        if self.cpu_strict and (not self.cpus or max(self.cpus) > MAX_MASK_CPU):
            out.append(f"cpu_strict pins each thread to one of the CPUs in cpus, so it needs a CPU list (of CPUs up "
                       f"to {MAX_MASK_CPU}, llama.cpp's mask)")
        if self.cache_type_v in QUANTIZED_CACHE_TYPES and self.flash_attn == "off":
            out.append("a quantized V cache needs flash attention (llama.cpp refuses it otherwise)")
        if self.numa in ("distribute", "isolate") and self.cpus:
            out.append(f"--numa {self.numa} places threads itself; it cannot be combined with a CPU list")
        if self.memory_policy != "default" and self.numa not in ("none", "numactl"):
            out.append("a memory policy is applied like numactl does and pairs with numa none or numactl")
        if self.parallel < 1 and self.parallel != -1:
            out.append("parallel must be at least 1, or -1 for llama-server's automatic slots")
        if self.ctx_size < 0:
            out.append("ctx_size must be positive (or 0 to leave it unset)")
        return out

    def least_batch_size(self) -> int:
        """The smallest batch llama-server starts with: two tokens (its start-up check decodes two) and one per
        slot. A smaller one aborts llama.cpp at start (get_sub_batch for one token, the n_outputs_max assertion
        below the slots), which tests/server/test_tiny_model_serves.py holds the pinned build to."""
        return max(2, slots_of(self.parallel))

    def validate(self, *, origin: str = "") -> RunConfig:
        """This configuration, or a :class:`UserError` naming every problem (and ``origin``: where it came from)."""
        problems = self.problems()
        if problems:
            where = f" in {origin}" if origin else ""
            raise UserError(f"invalid llama.cpp configuration{where}: " + "; ".join(problems),
                            "fix the settings named above" if not origin else
                            f"nothing was applied; {origin} was not written by this llamahost, or was changed "
                            "since: regenerate it")
        return self

    @property
    def pinned(self) -> bool:
        return bool(self.cpus)

    def effective_memory_nodes(self, cpu_nodes: tuple[int, ...]) -> tuple[int, ...]:
        return self.memory_nodes or cpu_nodes

    def key(self) -> str:
        """A stable identity, so the same configuration is recognised across trials and hosts.

        Settings added after studies were first stored (:data:`KEY_OPTIONAL_FIELDS`) join the key only when they
        differ from their default, so a key a study recorded before them still names the same configuration."""
        return ";".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                        if f.name not in KEY_OPTIONAL_FIELDS or getattr(self, f.name) != f.default)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpus"] = format_cpu_list(self.cpus)
        data["memory_nodes"] = format_cpu_list(self.memory_nodes)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str = "the configuration") -> RunConfig:
        """Rebuild a configuration from :meth:`to_dict`'s form, type-checked and validated.

        Every configuration read back from a result file or a study store comes through here before it is
        rendered into a unit file or a command line, so a poisoned row is refused, never rendered."""
        if not isinstance(data, Mapping):
            raise UserError(f"{origin} is not a mapping of settings", "regenerate it with this llamahost")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise UserError(f"unknown configuration keys: {', '.join(unknown)} (in {origin})",
                            f"use only: {', '.join(sorted(known))}")
        missing = sorted(f.name for f in fields(cls) if f.name in ("threads", "threads_batch") and f.name not in data)
        if missing:
            raise UserError(f"{origin} lacks {', '.join(missing)}", "regenerate it with this llamahost")
        values = {key: plain_scalar(value) for key, value in data.items()}
        for name in _CPU_LIST_FIELDS:
            raw = values.get(name, "")
            if isinstance(raw, str):
                values[name] = parse_cpu_list(raw)
            elif isinstance(raw, list | tuple):
                values[name] = tuple(plain_scalar(v) for v in raw)
        return cls(**values).validate(origin=origin)

    def with_changes(self, **changes: Any) -> RunConfig:
        return replace(self, **changes)

    # ---- renderings -------------------------------------------------------------------------------

    def server_args(self) -> list[str]:
        """``llama-server`` flags for this configuration (llama.cpp as vendored by the pinned build).

        CPU affinity and memory policy are not llama-server flags: they are applied to the process by
        whoever starts it (systemd ``CPUAffinity=``/``NUMAPolicy=``, or ``numactl``), see
        :meth:`role_vars` and :mod:`tuner.trial.placement`.
        """
        args = [
            "--threads", str(self.threads),
            "--threads-batch", str(self.threads_batch),
            "--batch-size", str(self.batch_size),
            "--ubatch-size", str(self.ubatch_size),
            "--flash-attn", self.flash_attn,
            "--cache-type-k", self.cache_type_k,
            "--cache-type-v", self.cache_type_v,
            "--parallel", str(self.parallel),
            "--cont-batching" if self.cont_batching else "--no-cont-batching",
        ]
        if self.ctx_size > 0:
            args += ["--ctx-size", str(self.ctx_size)]
        if self.numa != "none":
            args += ["--numa", self.numa]
        if self.load_mode != "auto":
            args += ["--load-mode", self.load_mode]
        if not self.repack:
            args.append("--no-repack")
        if self.cpu_strict:
            args += ["--cpu-mask", cpu_mask(self.cpus), "--cpu-strict", "1"]
        return args

    def server_environment(self) -> dict[str, str]:
        """Environment variables this configuration sets for the server process (systemd ``Environment=``
        in the role's unit and a live trial's drop-in; the process environment of a benchmark trial)."""
        if self.omp_wait_policy == "default":
            return {}
        return {"OMP_WAIT_POLICY": self.omp_wait_policy.upper()}

    def role_vars(self, kind: RunKind = "live") -> dict[str, Any]:
        """The ``llama_server_*`` variables that make the Ansible role run this configuration.

        ``kind`` is what measured it: a benchmark leaves out :data:`LIVE_ONLY_FIELDS` (it did not measure
        them, and writing them would clobber a multi-slot deployment's own)."""
        every = self._all_role_vars()
        if kind == "live":
            return every
        live_only = {f"{ROLE_PREFIX}{name}" for name in LIVE_ONLY_FIELDS}
        return {key: value for key, value in every.items() if key not in live_only}

    def _all_role_vars(self) -> dict[str, Any]:
        return {
            f"{ROLE_PREFIX}threads": self.threads,
            f"{ROLE_PREFIX}threads_batch": self.threads_batch,
            f"{ROLE_PREFIX}batch_size": self.batch_size,
            f"{ROLE_PREFIX}ubatch_size": self.ubatch_size,
            f"{ROLE_PREFIX}cpus": format_cpu_list(self.cpus),
            f"{ROLE_PREFIX}numa": self.numa,
            f"{ROLE_PREFIX}numa_policy": self.memory_policy,
            f"{ROLE_PREFIX}numa_nodes": format_cpu_list(self.memory_nodes),
            f"{ROLE_PREFIX}load_mode": self.load_mode,
            f"{ROLE_PREFIX}flash_attn": self.flash_attn,
            f"{ROLE_PREFIX}cache_type_k": self.cache_type_k,
            f"{ROLE_PREFIX}cache_type_v": self.cache_type_v,
            f"{ROLE_PREFIX}repack": self.repack,
            f"{ROLE_PREFIX}omp_wait_policy": self.omp_wait_policy,
            f"{ROLE_PREFIX}cpu_strict": self.cpu_strict,
            f"{ROLE_PREFIX}parallel": self.parallel,
            f"{ROLE_PREFIX}cont_batching": self.cont_batching,
        } | ({f"{ROLE_PREFIX}ctx_size": self.ctx_size} if self.ctx_size > 0 else {})

    @classmethod
    def from_role_vars(cls, variables: Mapping[str, Any], *, smt: bool = True,
                       physical_cores: int | None = None, source: str = "") -> RunConfig:
        """Read the configuration a host runs today back from its role variables (the baseline).

        The role reads ``threads: 0`` (or no threads at all) as "the physical cores", and
        ``threads_batch: 0`` as "the same as threads"; ``physical_cores`` resolves them. Settings llama-server
        cannot run are refused naming ``source``, where the user corrects them."""
        data: dict[str, Any] = {}
        for name in ("threads", "threads_batch", "batch_size", "ubatch_size", "numa", "load_mode",
                     "flash_attn", "cache_type_k", "cache_type_v", "parallel", "cont_batching", "ctx_size",
                     "repack", "omp_wait_policy", "cpu_strict"):
            key = f"{ROLE_PREFIX}{name}"
            if key in variables:
                data[name] = _as_typed(name, variables[key])
        cpus = str(variables.get(f"{ROLE_PREFIX}cpus", "") or "")
        data["cpus"] = parse_cpu_list(cpus)
        data["placement"] = "compact" if data["cpus"] else "os"
        data["memory_policy"] = variables.get(f"{ROLE_PREFIX}numa_policy", "default")
        data["memory_nodes"] = parse_cpu_list(str(variables.get(f"{ROLE_PREFIX}numa_nodes", "") or ""))
        data["smt"] = smt
        if not data.get("threads"):
            if physical_cores is None:
                raise UserError(f"{ROLE_PREFIX}threads is not set", "set it in host_vars or group_vars")
            data["threads"] = physical_cores
        if not data.get("threads_batch"):
            data["threads_batch"] = data["threads"]
        config = cls(**data)
        if not source:
            return config.validate()
        if problems := config.problems():
            raise UserError(f"the llama_server_* settings in {source} cannot run: " + "; ".join(problems),
                            f"correct them in {source} (the llama_server role refuses them too), then run again")
        return config
