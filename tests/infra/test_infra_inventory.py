"""The hand-off to Ansible: the inventory file writer and the dynamic inventory script, fed with the
outputs of the real program (under mocks), read back by the real ``ansible-inventory``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from infra_mocks import BASE_CONFIG, INFRA_DIR, deploy
from llamahost_infra.inventory import build_inventory, connection_vars
from ruamel.yaml import YAML

from tuner.atomic import previous_path
from tuner.errors import UserError

WRITER = INFRA_DIR / "write_inventory.py"
SCRIPT = INFRA_DIR / "stack_inventory.py"
ANSIBLE_INVENTORY = Path(sys.executable).with_name("ansible-inventory")


@pytest.fixture(scope="module")
def stack_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `pulumi stack output --json` prints for a two-host stack, from the real program under mocks."""
    outputs = deploy({**BASE_CONFIG, "count": 2}).outputs
    path = tmp_path_factory.mktemp("stack") / "outputs.json"
    path.write_text(json.dumps(outputs, indent=2))
    return path


def run(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        input=stdin,
        text=True,
        capture_output=True,
        check=False,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def ansible_inventory(source: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(
        [str(ANSIBLE_INVENTORY), "-i", str(source), "--list"],
        text=True,
        capture_output=True,
        check=False,
        env={**os.environ, "ANSIBLE_INVENTORY_UNPARSED_FAILED": "true", **(env or {})},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


def test_writer_writes_yaml_atomically_and_keeps_the_previous_file(
    stack_output: Path, tmp_path: Path
) -> None:
    target = tmp_path / "inventory.yml"
    done = run(str(WRITER), "--stack-output", str(stack_output), "--output", str(target))
    assert done.returncode == 0, done.stderr
    assert "2 host(s) in group llama_hosts" in done.stdout
    first = target.read_text()
    hosts = YAML(typ="safe").load(first)["all"]["children"]["llama_hosts"]["hosts"]
    assert sorted(hosts) == ["llamahost-test-0", "llamahost-test-1"]
    done = run(str(WRITER), "--output", str(target), stdin=stack_output.read_text())  # from stdin, as piped
    assert done.returncode == 0, done.stderr
    assert previous_path(target).read_text() == first
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        ("", "the stack output is empty"),
        ("{not json", "is not JSON"),
        ('{"region": "us-east-1"}', "has no 'hosts' list"),
        ('{"hosts": []}', "the stack output has no hosts"),
        ('{"hosts": [{"name": "a"}]}', "lacks instance_id, private_ip, vars"),
    ],
)
def test_writer_refuses_bad_input_and_leaves_the_file_alone(stdin: str, message: str, tmp_path: Path) -> None:
    target = tmp_path / "inventory.yml"
    target.write_text("# the previous inventory\n")
    done = run(str(WRITER), "--output", str(target), stdin=stdin)
    assert done.returncode == 2
    assert message in done.stderr and "fix:" in done.stderr
    assert "Traceback" not in done.stderr
    assert target.read_text() == "# the previous inventory\n"


def test_ansible_reads_the_written_inventory(stack_output: Path, tmp_path: Path) -> None:
    target = tmp_path / "inventory.yml"
    assert run(str(WRITER), "--stack-output", str(stack_output), "-o", str(target)).returncode == 0
    parsed = ansible_inventory(target)
    assert sorted(parsed["llama_hosts"]["hosts"]) == ["llamahost-test-0", "llamahost-test-1"]
    outputs = json.loads(stack_output.read_text())
    variables = parsed["_meta"]["hostvars"]["llamahost-test-1"]
    assert variables["ansible_connection"] == "amazon.aws.aws_ssm"
    assert variables["ansible_aws_ssm_instance_id"] == outputs["hosts"][1]["instance_id"]
    assert variables["ansible_aws_ssm_bucket_name"] == outputs["ssm_bucket"]
    assert variables["llamahost_numa_nodes"] == 1
    assert variables["llamahost_smt"] is False


def test_dynamic_script_gives_ansible_the_same_inventory(stack_output: Path, tmp_path: Path) -> None:
    target = tmp_path / "inventory.yml"
    assert run(str(WRITER), "--stack-output", str(stack_output), "-o", str(target)).returncode == 0
    # Ansible runs the script itself (its shebang finds python3 on PATH: the activated venv's).
    venv_path = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    from_script = ansible_inventory(SCRIPT, env={**venv_path, "LLAMAHOST_STACK_OUTPUT": str(stack_output)})
    from_file = ansible_inventory(target)
    assert from_script["_meta"] == from_file["_meta"]
    assert from_script["llama_hosts"] == from_file["llama_hosts"]


def test_dynamic_script_without_outputs_or_pulumi_fails_clearly(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "LLAMAHOST_STACK_OUTPUT": ""}
    done = run(str(SCRIPT), "--list", env=env)
    assert done.returncode == 2
    assert "the pulumi CLI is not on PATH" in done.stderr and "LLAMAHOST_STACK_OUTPUT" in done.stderr


def test_build_inventory_refuses_duplicates_and_needs_a_bucket_for_ssm() -> None:
    host = {"name": "h", "instance_id": "i-1", "private_ip": "10.0.0.1", "vars": {}}
    with pytest.raises(UserError, match="appears twice"):
        build_inventory([host, host])
    with pytest.raises(UserError, match="SSM access needs a transfer bucket"):
        connection_vars(
            access="ssm", instance_id="i-1", private_ip="10.0.0.1", region="us-east-1", ssm_bucket=None
        )
    ssh = connection_vars(
        access="ssh", instance_id="i-1", private_ip="10.0.0.1", region="us-east-1", ssm_bucket=None
    )
    assert ssh["ansible_host"] == "10.0.0.1"
