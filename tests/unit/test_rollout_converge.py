"""Why an apply failed, read from ansible-playbook's output: what the failed tasks said, not the timings recap."""

from __future__ import annotations

import json

from tuner.rollout.converge import MESSAGE_CHARS, why_it_failed

HEALTH = "llama-server.service exited with status 134 | journal: GGML_ASSERT(n_outputs_max <= cparams.n_outputs_max)"
ROLLED_BACK = ("the new llama-server did not come up healthy: " + HEALTH
               + ". The previous unit was restored and is serving again (with the build it ran, which is kept).")


def playbook_output(*failures: tuple[str, dict[str, object]]) -> str:
    lines = ["PLAY [Serve the model] ***", "", "TASK [llamahost.host.llama_server : Restart the server] ***",
             "changed: [rack7-a]"]
    for host, result in failures:
        lines += ["TASK [llamahost.host.llama_server : a task] ***",
                  f"fatal: [{host}]: FAILED! => {json.dumps(result)}"]
    lines += ["", "PLAY RECAP ***", "rack7-a : ok=30 changed=3 unreachable=0 failed=1 skipped=4 rescued=1",
              "", "TASKS RECAP ***", "Monday 07 December 2026  12:17:46 +0000 (0:00:00.032)       0:01:59.616 ***"]
    lines += [f"llamahost.host.llama_server : task {n} ---- {n}.00s" for n in range(30)]
    return "\n".join(lines) + "\n"


def test_each_failed_task_says_why_in_order_and_the_recaps_are_left_out() -> None:
    output = playbook_output(("rack7-a", {"changed": False, "msg": HEALTH, "journal": ["a", "b"]}),
                             ("rack7-a", {"changed": False, "msg": ROLLED_BACK}))
    assert why_it_failed(output) == f"rack7-a: {HEALTH}\nrack7-a: {ROLLED_BACK}"


def test_an_unreachable_host_and_a_folded_message_read_as_one_line_each() -> None:
    output = playbook_output(("rack7-b", {"changed": False, "msg": "refused:\n  llama_server_cpus (0,2)\n  must be"}))
    output += ('fatal: [rack7-c]: UNREACHABLE! => {"changed": false, '
               '"msg": "ssh: connect to host 10.0.0.9 port 22: timed out"}\n')
    assert why_it_failed(output).splitlines() == [
        "rack7-b: refused: llama_server_cpus (0,2) must be",
        "rack7-c: ssh: connect to host 10.0.0.9 port 22: timed out"]


def test_a_long_message_is_cut_and_a_result_without_json_is_kept_as_printed() -> None:
    long = playbook_output(("rack7-a", {"msg": "x" * (3 * MESSAGE_CHARS)}))
    said = why_it_failed(long)
    assert said.endswith(" [...]") and len(said) == MESSAGE_CHARS + len(" [...]")
    assert why_it_failed("fatal: [h1]: FAILED! => not json at all\n") == "h1: not json at all"


def test_without_a_failed_task_the_lines_before_the_recaps_are_shown() -> None:
    output = playbook_output()
    output = output.replace("changed: [rack7-a]", "ERROR! the role 'llamahost.host.llama_server' was not found")
    said = why_it_failed(output, tail_lines=5)
    assert "was not found" in said and "RECAP" not in said and "----" not in said
