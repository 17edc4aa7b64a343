"""The safety chain from a proven result to an Ansible vars file: only what was measured, on what serves.

A result file is input from elsewhere: a fleet host wrote it, or someone handed it over. Its settings end
up in a root-owned systemd unit on every host of a group, so nothing in it is trusted as written. Every
write-back (``llamahost write-back``, ``tune --live --host-vars``, ``playbooks/tune_fleet.yml``) goes
through :func:`write_back`, which runs these steps in this order and stops at the first that fails,
leaving the vars file byte-identical:

1. **validate**: only a significant improvement passes; its configuration is rebuilt through
   :class:`~tuner.config.RunConfig` (types, bounds, choices: no value can carry a newline or a flag), and
   the result's ``role_vars`` must be exactly what that configuration renders for the kind of run that
   measured it (:func:`proven_change`);
2. **merge**: a benchmark result carries only what a benchmark measures; a live server's slots,
   continuous batching and context size stay as the deployment has them;
3. **check the model, the build and the hardware**: every target host must serve the model the result
   was measured on (its resolved ``llama_server_model_sha256``); a benchmark result must have been
   measured on the llama-server build the role installs there (binary mode: the sha256 of
   ``llama_server_binary_src``, by default this machine's portable build); and the result must come
   from the target's hardware group when that is known (``--hardware``);
4. **write** the variables (comments and order kept, atomic, previous file as ``.prev``), with the sha256
   of the build they were measured on (``llama_server_tuned_binary_sha256``): the role refuses to copy
   another build next to them, so a later change of ``llama_server_binary_src`` or of this machine's
   portable build cannot serve them unmeasured;
5. **check the resolved vars**: ``ansible-inventory`` must resolve every written variable to the written
   value on every target host; when another source outranks the file, the file is put back as it was and
   the message names the variable and the files that set it.

The rollout (``playbooks/llama_server.yml``) starts only after all of this held.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.config import RunConfig, RunKind, plain_scalar
from tuner.errors import UserError
from tuner.inventory import ResolvedInventory, files_setting, inventory_of, resolve_inventory
from tuner.model.checksum import cached_sha256, combined_sha256
from tuner.result import IMPROVED, TuneResult, run_kind, write_result
from tuner.server.build import server_binary
from tuner.writeback import PlannedWrite, WriteBack, load_vars_file, plan_vars, write_vars

# How far a run's change got, recorded in its result file as ``write_back.state``.
STATE_NOTHING_TO_WRITE = "nothing to write"
STATE_PROVEN = "proven, not yet written"
STATE_REFUSED = "refused by the safety checks"
STATE_WRITTEN = "written"
STATE_APPLY_FAILED = "apply failed, vars file restored"
STATE_APPLIED = "written and applied"

MODEL_SHA_VAR = "llama_server_model_sha256"
INSTALL_MODE_VAR = "llama_server_install_mode"
BINARY_SRC_VAR = "llama_server_binary_src"
TUNED_BINARY_VAR = "llama_server_tuned_binary_sha256"


@dataclass(frozen=True)
class ProvenChange:
    """What a result may change: its settings rebuilt and checked, and what they were measured on."""

    study: str
    kind: RunKind
    role_vars: dict[str, Any]
    model_sha256: str
    hardware: frozenset[str]  # the host fingerprint and, for a fleet result, the group's digest
    note: str
    # The llama-server build the settings were measured on (sha256, path): a benchmark's trials ran it, a live
    # run read it from the deployment (None where it could not).
    server: tuple[str, str] | None = None

    @property
    def build_sha256(self) -> str:
        """What the role checks its binary against ("" when the build is unknown)."""
        return self.server[0] if self.server else ""

    @property
    def vars_to_write(self) -> dict[str, Any]:
        """The settings and the build they were measured on (an unknown build clears an earlier one, which
        these settings were not measured on)."""
        return {**self.role_vars, TUNED_BINARY_VAR: self.build_sha256}


def _improvement(result: dict[str, Any]) -> dict[str, Any]:
    improvement = result.get("improvement")
    if not isinstance(improvement, dict) or improvement.get("significant") is not True:
        raise UserError("the result's improvement is not statistically significant", "nothing was written")
    for key in ("ratio", "ci_low", "ci_high"):
        if not isinstance(improvement.get(key), int | float):
            raise UserError(f"the result's improvement has no numeric {key}", "regenerate the result")
    return improvement


def proven_change(result: dict[str, Any]) -> ProvenChange | None:
    """The settings a result may write, rebuilt and checked; ``None`` when it proved no improvement (the
    deployed configuration stands: nothing to write). Any inconsistency is a :class:`UserError`."""
    if result.get("verdict") != IMPROVED:
        return None
    improvement = _improvement(result)
    kind = run_kind(result)
    settings = result.get("settings")
    if not isinstance(settings, dict) or not isinstance(settings.get("role_vars"), dict):
        raise UserError("the result has no settings.role_vars", "regenerate the result with this llamahost")
    config = RunConfig.from_dict(settings.get("config") or {}, origin="the result's settings.config")
    expected = config.role_vars(kind)
    given = {key: plain_scalar(value) for key, value in settings["role_vars"].items()}
    extra = sorted(set(given) - set(expected))
    if extra:
        raise UserError(f"the result asks to write variables a {kind} run does not measure: {', '.join(extra)}",
                        "nothing was written; only the tuner's own settings are written back - regenerate the "
                        "result with this llamahost")
    differing = sorted(k for k in expected if k in given and (given[k] != expected[k]
                                                              or type(given[k]) is not type(expected[k])))
    if differing:
        raise UserError(f"the result's role_vars do not match its measured configuration: {', '.join(differing)}",
                        "nothing was written; the result was changed after the tuner wrote it - regenerate it")
    model = result.get("model") or {}
    sha = str(model.get("sha256", "")).lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise UserError("the result does not name its model's sha256", "regenerate the result with this llamahost")
    measured_on = ((result.get("host") or {}).get("fingerprint"), (result.get("fleet") or {}).get("group"))
    hardware = {str(v) for v in measured_on if v}
    written = result.get("written", "?")
    note = (f"tuned by llamahost {written}: study {result.get('study')}, {result.get('objective')} "
            f"x{improvement['ratio']:.3f} [{improvement['ci_low']:.3f}, {improvement['ci_high']:.3f}]")
    measured = _measured_server(result)
    if measured is None and kind != "live":
        raise UserError("the result does not name the llama-server build it was measured on",
                        "nothing was written; tune again with this llamahost (its trials run the build the role "
                        "deploys, and the result names it)")
    return ProvenChange(study=str(result.get("study")), kind=kind, role_vars=expected, model_sha256=sha,
                        hardware=frozenset(hardware), note=note, server=measured)


def _measured_server(result: dict[str, Any]) -> tuple[str, str] | None:
    """The llama-server build a result was measured on, as (sha256, path): a benchmark's trials ran it, a live
    run read it from the deployment (None where it could not)."""
    server = (result.get("llama_cpp") or {}).get("llama_server")
    sha = str(server.get("sha256", "")).lower() if isinstance(server, dict) else ""
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        return None
    assert isinstance(server, dict)
    return sha, str(server.get("path", "?"))


def check_binary(change: ProvenChange, deployed_vars: dict[str, Any], where: str) -> None:
    """The target must run the llama-server build the result was measured on. In binary mode the role copies
    ``llama_server_binary_src`` (empty: this machine's portable build), so its sha256 can be compared here;
    source and python modes build llama.cpp on the host, which only a live tune there measures."""
    if change.kind == "live" or change.server is None:  # a live run measured the deployment's own build
        return
    measured_sha, measured_path = change.server
    mode = str(deployed_vars.get(INSTALL_MODE_VAR) or "binary")
    if mode != "binary":
        raise UserError(f"{where} builds llama.cpp itself ({INSTALL_MODE_VAR}: {mode}), so it would not run the "
                        f"llama-server the result was measured on ({measured_sha[:12]}...)",
                        f"nothing was written; tune that host live (`llamahost tune --live`), or deploy the "
                        f"measured build: {INSTALL_MODE_VAR}: binary, {BINARY_SRC_VAR}: {measured_path}")
    source = str(deployed_vars.get(BINARY_SRC_VAR) or "")
    if "{{" in source:
        raise UserError(f"{where} sets {BINARY_SRC_VAR} through a template, which only ansible-playbook resolves",
                        f"write {BINARY_SRC_VAR} as a literal path; nothing was written")
    binary = Path(source) if source else server_binary("portable")
    if not binary.is_file():
        raise UserError(f"{where} deploys {BINARY_SRC_VAR} {binary}, which does not exist on this machine",
                        f"nothing was written; point {BINARY_SRC_VAR} at the measured build {measured_path}")
    deployed = cached_sha256(binary)  # every host of a group deploys the same file: hashed once
    if deployed != measured_sha:
        raise UserError(f"the result was measured on llama-server {measured_sha[:12]}... ({measured_path}), but "
                        f"{where} deploys {deployed[:12]}... ({binary})",
                        f"nothing was written; tune with --server-binary {binary}, or deploy the measured build "
                        f"({BINARY_SRC_VAR}: {measured_path})")


def check_hardware(change: ProvenChange, expected: str | None) -> None:
    """The result must come from the target's hardware group (when the caller knows it)."""
    if expected and expected not in change.hardware:
        raise UserError(f"the result was measured on other hardware ({', '.join(sorted(change.hardware)) or 'unknown'})"
                        f" than the target's group {expected}",
                        "nothing was written; tune on the target's own hardware group (`llamahost fleet fingerprint` "
                        "on a target host shows it)")


def check_model(change: ProvenChange, deployed: Any, where: str) -> None:
    """The target must serve the model the result was measured on (a split model's list of shard digests is
    compared as the one digest the tuner gives it)."""
    digests = [str(d) for d in deployed] if isinstance(deployed, list) else [str(deployed or "")]
    if not all(d.strip() for d in digests) or not digests:
        raise UserError(f"{where} does not say which model it serves ({MODEL_SHA_VAR} is not set)",
                        f"set {MODEL_SHA_VAR} for it (the role needs it too); nothing was written")
    if any("{{" in d for d in digests):
        raise UserError(f"{where} sets {MODEL_SHA_VAR} through a template, which only ansible-playbook resolves",
                        f"write {MODEL_SHA_VAR} as the literal sha256; nothing was written")
    served = combined_sha256(digests)
    if served != change.model_sha256:
        raise UserError(f"the result was measured on model {change.model_sha256[:12]}..., but {where} serves "
                        f"{served[:12]}...",
                        "nothing was written; tune the model the hosts serve (pass it with --model)")


@dataclass(frozen=True)
class WriteBackOutcome:
    """What :func:`write_back` did: ``written`` is None when the result proved nothing to write."""

    change: ProvenChange | None
    written: WriteBack | None
    targets: tuple[str, ...]  # the inventory hosts whose resolved vars were checked (empty: a bare file)
    diff: str = ""  # the vars file's unified diff (a dry run)
    dry_run: bool = False
    resolved_checked: bool = False  # whether Ansible's resolution of the written values was checked


def _resolve(inventory: Path | None, *, inferred: bool) -> ResolvedInventory | None:
    if inventory is None or (inferred and not inventory.is_dir()):
        return None
    resolved = resolve_inventory(inventory)
    # host_vars/ next to no inventory source is a bare file, not an inventory
    return resolved if resolved.hostvars or not inferred else None


def overrides(resolved: ResolvedInventory, targets: tuple[str, ...], wanted: dict[str, Any]) -> dict[str, list[str]]:
    """Per winner variable, the target hosts on which Ansible resolves another value than ``wanted`` (pure)."""
    found: dict[str, list[str]] = {}
    for host in targets:
        for key, value in wanted.items():
            if resolved.hostvars.get(host, {}).get(key) != value:
                found.setdefault(key, []).append(host)
    return found


def _outranked(vars_file: Path, root: Path, beaten: dict[str, list[str]]) -> UserError:
    details = []
    for key, hosts in sorted(beaten.items()):
        sources = files_setting(root, key, besides=[vars_file])
        named = ", ".join(str(p) for p in sources) or "a source outside the inventory directory (extra vars?)"
        details.append(f"{key} on {', '.join(hosts)} (set in {named})")
    return UserError(f"another source outranks {vars_file} for the winner's variables, so the hosts would run a mix "
                     f"that was never measured: {'; '.join(details)}",
                     f"{vars_file} was left as it was; remove those variables from the files named (or write the "
                     "result into the file that sets them), then write back again")


def _check_resolution_dry(source: Path, resolved: ResolvedInventory, vars_file: Path, plan: PlannedWrite,
                          targets: tuple[str, ...], wanted: dict[str, Any]) -> bool:
    """Step 5 of the chain for a dry run: the planned file is written into a throw-away copy of the inventory
    directory, and that copy is resolved (a file that would not change is checked as it resolves now). Raises
    as the real check does; returns False when the vars file lies outside the inventory directory, so no copy
    can show what Ansible would resolve."""
    root = (source if source.is_dir() else source.parent).resolve()
    if not plan.changed:
        beaten = overrides(resolved, targets, wanted)
        if beaten:
            raise _outranked(vars_file, root, beaten)
        return True
    try:
        inside = vars_file.resolve().relative_to(root)
    except ValueError:
        return False
    with tempfile.TemporaryDirectory(prefix="llamahost-dry-run-") as scratch:
        copy = Path(scratch) / root.name
        shutil.copytree(root, copy, symlinks=True, ignore=shutil.ignore_patterns("*.prev", "*.tmp"))
        (copy / inside).parent.mkdir(parents=True, exist_ok=True)
        (copy / inside).write_text(plan.text)
        copied_source = copy if source.is_dir() else copy / source.resolve().relative_to(root)
        beaten = overrides(resolve_inventory(copied_source), targets, wanted)
    if beaten:
        raise _outranked(vars_file, root, beaten)
    return True


def write_back(result: dict[str, Any], vars_file: Path, *, inventory: Path | None = None,
               hardware: str | None = None, dry_run: bool = False) -> WriteBackOutcome:
    """Run the whole chain (module docstring) and write a proven change into ``vars_file``.

    ``dry_run`` runs every check, the resolved-vars one on a copy of the inventory, and writes nothing: the
    outcome carries the diff the write would make."""
    change = proven_change(result)
    if change is None:
        return WriteBackOutcome(change=None, written=None, targets=())
    check_hardware(change, hardware)
    source = inventory if inventory is not None else inventory_of(vars_file)
    resolved = _resolve(source, inferred=inventory is None)
    targets: tuple[str, ...] = ()
    if resolved is not None:
        targets = resolved.targets_of(vars_file)
        for host in targets:
            check_model(change, resolved.hostvars[host].get(MODEL_SHA_VAR), f"host {host}")
            check_binary(change, resolved.hostvars[host], f"host {host}")
    else:
        given = dict(load_vars_file(vars_file))
        if given.get(MODEL_SHA_VAR) is not None:
            check_model(change, given[MODEL_SHA_VAR], str(vars_file))
        check_binary(change, given, str(vars_file))
    wanted = change.vars_to_write
    if dry_run:
        plan = plan_vars(vars_file, wanted, note=change.note)
        checked = source is not None and resolved is not None and _check_resolution_dry(
            source, resolved, vars_file, plan, targets, wanted)
        return WriteBackOutcome(change=change, written=WriteBack(vars_file, plan.changed, plan.previous),
                                targets=targets, diff=plan.diff, dry_run=True, resolved_checked=checked)
    written = write_vars(vars_file, wanted, note=change.note)
    if source is not None and resolved is not None:
        beaten = overrides(resolve_inventory(source), targets, wanted)
        if beaten:
            written.restore()
            raise _outranked(vars_file, source if source.is_dir() else source.parent, beaten)
    return WriteBackOutcome(change=change, written=written, targets=targets,
                            resolved_checked=source is not None and resolved is not None)


def record_write_back(result_path: Path, result: TuneResult, vars_file: Path | None, state: str,
                      written: WriteBack | None = None, *, applied: bool = False, reason: str | None = None) -> None:
    """Save the result with the write-back's state: the proof is on disk before anything is changed, and the
    file says how far the change got."""
    result.write_back = {
        "state": state,
        "host_vars": str(vars_file) if vars_file else None,
        "changed": {k: list(v) for k, v in written.changed.items()} if written else {},
        "applied": applied,
        **({"reason": reason} if reason else {}),
    }
    write_result(result_path, result)


def save_and_write(result_path: Path, result: TuneResult, vars_file: Path | None, *,
                   inventory: Path | None, hardware: str | None) -> WriteBack | None:
    """What a tuning run does with its result: save it first (``proven, not yet written`` when it proved a
    winner), then write the winner into ``vars_file`` through :func:`write_back`, recording each step. Returns
    what was written (``None``: nothing to write, or no file asked for); a refusal is recorded, then raised."""
    proven = result.improved
    record_write_back(result_path, result, vars_file, STATE_PROVEN if proven else STATE_NOTHING_TO_WRITE)
    if not proven or vars_file is None:
        return None
    try:
        written = write_back(result.to_dict(), vars_file, inventory=inventory, hardware=hardware).written
    except UserError as exc:
        record_write_back(result_path, result, vars_file, STATE_REFUSED, reason=str(exc))
        raise
    assert written is not None  # an improved verdict either writes or raises
    record_write_back(result_path, result, vars_file, STATE_WRITTEN, written)
    return written


def written_message(vars_file: Path, written: WriteBack | None, summary: object) -> str:
    """One line for the user on what a run did to ``vars_file``."""
    if written is None:
        return f"{vars_file} left unchanged: {summary}"
    return f"{vars_file}: {len(written.changed)} setting(s) written (previous file kept as {vars_file.name}.prev)"
