"""Write-back into host_vars: the user's file stays theirs, the write is atomic, and only proven results go in."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from result_support import DEPLOYS_MEASURED_SERVER, MEASURED_SERVER, WINNER, proven_result, write_result_file
from ruamel.yaml import YAML

from tuner.atomic import previous_path
from tuner.errors import UserError
from tuner.model.checksum import sha256_of
from tuner.safe_change import TUNED_BINARY_VAR
from tuner.writeback import write_vars

ORIGINAL = """\
---
# Production inference host in rack 4.
ansible_host: 10.0.4.12   # management network

# Server settings
llama_server_threads: 32
llama_server_batch_size: 2048   # large for RAG prompts
llama_server_model_url: "https://models.example/m.gguf"
hugepages_count_2m: [512, 512]
""" + DEPLOYS_MEASURED_SERVER


def test_values_change_in_place_and_comments_survive(tmp_path: Path) -> None:
    path = tmp_path / "h1.yml"
    path.write_text(ORIGINAL)
    result = write_vars(path, {"llama_server_threads": 24, "llama_server_batch_size": 2048,
                               "llama_server_cpus": "0", "llama_server_numa": "numactl"},
                        note="tuned by llamahost: study s1, +12% tg")
    assert result.changed == {"llama_server_threads": (32, 24), "llama_server_cpus": (None, "0"),
                              "llama_server_numa": (None, "numactl")}
    text = path.read_text()
    for kept in ("# Production inference host in rack 4.", "# management network", "# large for RAG prompts",
                 '"https://models.example/m.gguf"', "hugepages_count_2m: [512, 512]"):
        assert kept in text
    assert text.startswith("---\n")
    assert "llama_server_threads: 24" in text
    assert text.index("llama_server_threads") < text.index("llama_server_model_url"), "order kept"
    assert text.index("# tuned by llamahost: study s1") < text.index("llama_server_cpus: '0'")
    assert YAML(typ="safe").load(text)["llama_server_cpus"] == "0", "a CPU list stays a string"
    assert previous_path(path).read_text() == ORIGINAL


def test_nothing_is_written_when_nothing_changes(tmp_path: Path) -> None:
    path = tmp_path / "h1.yml"
    path.write_text(ORIGINAL)
    result = write_vars(path, {"llama_server_threads": 32}, note="x")
    assert not result.wrote
    assert not previous_path(path).exists()


def test_missing_file_is_created(tmp_path: Path) -> None:
    path = tmp_path / "host_vars" / "new.yml"
    write_vars(path, {"llama_server_threads": 8}, note="tuned")
    assert YAML(typ="safe").load(path.read_text()) == {"llama_server_threads": 8}


@pytest.mark.parametrize(("content", "fragment"), [("a: [1, 2\n", "not valid YAML"), ("- 1\n- 2\n", "mapping")])
def test_broken_files_are_refused_untouched(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "h1.yml"
    path.write_text(content)
    with pytest.raises(UserError, match=fragment):
        write_vars(path, {"llama_server_threads": 8}, note="x")
    assert path.read_text() == content


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tuner.writeback import write_vars
    path = Path(sys.argv[1])
    i = 0
    while True:
        i += 1
        write_vars(path, {"llama_server_threads": i, "llama_server_blob": "x" * 200_000 + str(i)}, note="n")
        if i == 1:
            print("writing", flush=True)
""")


def test_killing_the_writer_never_leaves_a_half_written_file(tmp_path: Path) -> None:
    path = tmp_path / "h1.yml"
    path.write_text(ORIGINAL)
    rng = random.Random(5)
    safe = YAML(typ="safe")
    for _ in range(12):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE)
        assert writer.stdout is not None and writer.stdout.readline() == b"writing\n"
        time.sleep(rng.random() * 0.3)  # somewhere inside the write loop
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        data = safe.load(path.read_text())  # always a complete document
        assert data["ansible_host"] == "10.0.4.12"
        assert data["llama_server_blob"].endswith(str(data["llama_server_threads"]))
    # what killed writers left behind is cleaned up by the next one
    write_vars(path, {"llama_server_threads": 1}, note="n")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ---- `llamahost write-back`: any result file (single host or a group's) into a vars file -------------------

def result_file(tmp_path: Path, verdict: str, *, significant: bool) -> Path:
    return write_result_file(tmp_path / f"{verdict}.yaml", proven_result(verdict=verdict, significant=significant))


def write_back(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuner.cli", "write-back", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


def test_write_back_writes_a_proven_result_and_says_what_changed(tmp_path: Path) -> None:
    import json

    path = tmp_path / "group_vars" / "rack7.yml"
    path.parent.mkdir()
    path.write_text(ORIGINAL)
    done = write_back(str(result_file(tmp_path, "improved", significant=True)), "--vars", str(path), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["wrote"] and report["changed"] == {
        "llama_server_threads": [32, 24], "llama_server_batch_size": [2048, 1024],
        **{key: [None, value] for key, value in WINNER.role_vars("benchmark").items()
           if key not in ("llama_server_threads", "llama_server_batch_size")},
        TUNED_BINARY_VAR: [None, sha256_of(MEASURED_SERVER)]}  # the build it was measured on, for the role
    text = path.read_text()
    assert "# management network" in text and "# tuned by llamahost 2026-11-22" in text
    assert "study fleet-smol-tg, tg x1.120 [1.050, 1.200]" in text
    assert previous_path(path).read_text() == ORIGINAL
    again = write_back(str(result_file(tmp_path, "improved", significant=True)), "--vars", str(path), "--json")
    assert json.loads(again.stdout)["wrote"] is False, "the second write of the same result changes nothing"


def test_write_back_of_a_standing_baseline_leaves_the_file_alone_and_succeeds(tmp_path: Path) -> None:
    path = tmp_path / "h1.yml"
    path.write_text(ORIGINAL)
    text = result_file(tmp_path, "baseline-stands", significant=False).read_text()
    done = write_back("-", "--vars", str(path), stdin=text)
    assert done.returncode == 0, done.stderr
    assert "left unchanged: baseline-stands summary" in done.stdout
    assert path.read_text() == ORIGINAL and not previous_path(path).exists()


@pytest.mark.parametrize(("stdin", "fragment"), [("{not yaml", "not a readable result"),
                                                 ('{"verdict": "improved"}', "not a llamahost result")])
def test_write_back_refuses_what_is_not_a_result(tmp_path: Path, stdin: str, fragment: str) -> None:
    path = tmp_path / "h1.yml"
    path.write_text(ORIGINAL)
    done = write_back("-", "--vars", str(path), stdin=stdin)
    assert done.returncode == 2 and fragment in done.stderr and "Traceback" not in done.stderr
    assert path.read_text() == ORIGINAL


@pytest.mark.parametrize("word", ["on", "off", "yes", "no", "y", "012", "1e3", "null"])
def test_strings_are_written_so_that_ansible_reads_them_as_strings(tmp_path: Path, word: str) -> None:
    """This file's parser speaks YAML 1.2; Ansible's loader speaks YAML 1.1, where `on` is a boolean: a flash
    attention setting of "on" written bare would reach the role as True."""
    import yaml

    path = tmp_path / "h1.yml"
    path.write_text("---\nllama_server_flash_attn: on   # written by hand, read by Ansible as true\n")
    written = write_vars(path, {"llama_server_flash_attn": "on", "llama_server_cache_type_k": word}, note="n")
    assert set(written.changed) == {"llama_server_flash_attn", "llama_server_cache_type_k"}, "the bare `on` is fixed"
    assert yaml.safe_load(path.read_text()) == {"llama_server_flash_attn": "on", "llama_server_cache_type_k": word}
    assert "# written by hand" in path.read_text()
    assert not write_vars(path, {"llama_server_flash_attn": "on", "llama_server_cache_type_k": word}, note="n").wrote
