"""Two rows of the fault table (docs/reliability.md) that the user meets at the start of a run: a live host that
cannot be reached over SSH, and an explicit ``--study`` made for another model file.

The first runs the real command line against an inventory host on a closed loopback port, so ssh fails at once;
the second opens a real SQLite study store in ``tmp_path`` the way ``llamahost tune`` opens it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from model_support import a_model
from optuna.trial import TrialState

from tuner.errors import UserError
from tuner.model.checksum import model_sha256
from tuner.probe import read_host
from tuner.space import SearchSpace
from tuner.study import StudyBinding, open_storage, open_study
from tuner.trial.protocol import Workload
from tuner.tune import default_study_name, workload_attrs

HOST = Path(__file__).resolve().parents[1] / "fixtures" / "hosts" / "epyc-kvm-2vcpu"
DEPLOYED = """\
# llama_server settings for h1 (kept by hand; llamahost may update the tuned ones)
llama_server_threads: 4   # half the cores
llama_server_parallel: 2
"""


def closed_port() -> int:
    """A loopback port nothing listens on: bound by the kernel's choice, then released."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def llamahost(*args: str, home: Path, tmpdir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLAMAHOST_HOME": str(home), "TMPDIR": str(tmpdir)}
    return subprocess.run([sys.executable, "-m", "tuner.cli", *args], capture_output=True, text=True, timeout=60,
                          env=env, check=False)


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def processes_naming(fragment: str) -> list[str]:
    """Command lines of live processes that mention ``fragment`` (an ssh master left behind would)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # the process ended while we looked
        if fragment in text:
            found.append(text)
    return found


# ---- "A live host is unreachable at the start" ----------------------------------------------------------------

def test_an_unreachable_live_host_is_named_with_exit_2_and_nothing_is_written(tmp_path: Path) -> None:
    port = closed_port()
    inventory = tmp_path / "inv" / "hosts.yml"
    (inventory.parent / "host_vars").mkdir(parents=True)
    inventory.write_text(yaml.safe_dump({"llama_hosts": {"hosts": {"h1": {
        "ansible_host": "127.0.0.1", "ansible_port": port, "ansible_user": "tuner"}}}}))
    host_vars = inventory.parent / "host_vars" / "h1.yml"
    host_vars.write_text(DEPLOYED)
    before = files_under(inventory.parent)
    home, tmpdir = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmpdir.mkdir()
    store, result = tmp_path / "studies.db", tmp_path / "result.yaml"

    done = llamahost("tune", "--live", "--inventory", str(inventory), "--host", "h1", "--budget", "20m",
                     "--study", "night", "--storage", f"sqlite:///{store}", "--output", str(result),
                     "--host-vars", str(host_vars), "--apply", home=home, tmpdir=tmpdir)

    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("llamahost: error: cannot connect to h1 (127.0.0.1) over SSH: "), done.stderr
    assert f"port {port}: Connection refused" in done.stderr, done.stderr  # ssh's own reason, quoted
    assert "`ansible -i INVENTORY h1 -m ping` must work" in done.stderr, done.stderr  # the fix
    # Nothing changes: the inventory byte for byte, no study store, no result, no report, nothing in the data
    # directory, no SSH control directory and no ssh master left behind.
    assert files_under(inventory.parent) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "inv", "tmp"]
    assert not store.exists() and not result.exists() and not result.with_suffix(".html").exists()
    assert list(home.iterdir()) == [] and list(tmpdir.iterdir()) == []
    assert processes_naming(str(tmpdir)) == []


# ---- "The model changed since the study or group was made (another sha256)": `tune --study` --------------------

def tune_binding(model_sha: str) -> StudyBinding:
    """The binding ``llamahost tune`` gives a study (tuner.tune.prepare), on the fixture host, for one model file."""
    probe = read_host(HOST)
    return StudyBinding(host_fingerprint=probe.fingerprint(), model_sha256=model_sha, objective="tg",
                        workload=workload_attrs(Workload()),
                        extra={"host": probe.fingerprint_fields(), "model_path": "/models/m.gguf",
                               "model_synthetic": False, "hostname": probe.hostname},
                        llama_server_sha256="5" * 64)


def snapshot(study: optuna.Study) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
    return study.user_attrs, [(t.number, t.state, t.values, t.params, t.user_attrs)
                              for t in study.get_trials(deepcopy=False)]


def test_an_explicit_study_made_for_another_model_file_is_refused_and_kept(tmp_path: Path) -> None:
    old_file, new_file = tmp_path / "old.gguf", tmp_path / "new.gguf"
    old_file.write_bytes(b"GGUF" + b"\x01" * 64)
    new_file.write_bytes(b"GGUF" + b"\x02" * 64)  # the model was replaced: same name and size, other bytes
    old_sha, new_sha = model_sha256((old_file,)), model_sha256((new_file,))
    assert old_sha != new_sha
    space = SearchSpace(read_host(HOST), a_model(), "tg")
    url = f"sqlite:///{tmp_path / 'studies.db'}"

    study, created = open_study("night", open_storage(url), tune_binding(old_sha),
                                baseline_params=space.baseline_params())
    assert created
    study.add_trial(optuna.trial.create_trial(value=12.5, user_attrs={"config_key": "threads=2"}))  # a measured trial
    before = snapshot(study)
    store_bytes = (tmp_path / "studies.db").read_bytes()

    with pytest.raises(UserError) as refused:  # `tune --study night` with the new file
        open_study("night", open_storage(url), tune_binding(new_sha), baseline_params=space.baseline_params())
    assert refused.value.problem == (f"study 'night' was made for a different model file (sha256): {old_sha} here "
                                     f"is {new_sha}")
    assert refused.value.fix == "pass a new --study name (results from different conditions are not comparable)"

    again = optuna.load_study(study_name="night", storage=url)
    assert snapshot(again) == before and again.user_attrs["model_sha256"] == old_sha
    assert [t[1] for t in before[1]] == [TrialState.WAITING, TrialState.COMPLETE]  # the queued baseline, a trial
    assert (tmp_path / "studies.db").read_bytes() == store_bytes, "the refusal wrote nothing to the store"
    assert optuna.study.get_all_study_names(url) == ["night"], "no study was created by the refused run"

    # Without --study the name carries the model's sha256: the new file gets a study of its own, the old one is kept.
    probe = read_host(HOST)
    model = dataclasses.replace(a_model(), path=new_file, files=(new_file,))
    default = default_study_name(model, new_sha, "tg", probe)
    assert default != default_study_name(model, old_sha, "tg", probe) and new_sha[:8] in default
    _, created = open_study(default, open_storage(url), tune_binding(new_sha), baseline_params=space.baseline_params())
    assert created and sorted(optuna.study.get_all_study_names(url)) == sorted(["night", default])
    assert snapshot(optuna.load_study(study_name="night", storage=url)) == before
