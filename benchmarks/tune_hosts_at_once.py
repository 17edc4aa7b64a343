"""Benchmark: the wall time of playbooks/tune.yml on two hosts at once against one host (issue 14).

tune.yml starts `llamahost tune --live --unit` on every host of the play at the same time, so a group should
tune in one budget, not in one budget per host. This measures it on two QEMU lab hosts booted side by side
from the converged lab disk (the one `pytest tests/lab` saves for the current roles):

1. both hosts boot (named ``bench-a`` and ``bench-b`` in the lab cache), and the llamahost_tuner role installs
   llamahost on both from a wheelhouse built here (timed, then left out of the tune runs: tune_install=false);
2. each round runs tune.yml twice with the same budget, in alternating order: on ``bench-a`` alone (``--limit``),
   and on both hosts; before each run the hosts' tune state is wiped, so every run is a new run, not a collected
   or resumed one;
3. the reported number is the ratio of the two wall times per round (median over rounds): about 1.0 means the
   budget is the night, 2.0 would mean one night per host. Each host's trial count and verdict are reported
   too, so a run that only waited is not mistaken for one that tuned.

Both guests share this machine's cores under TCG, so a two-host run measures each trial slower than a
one-host run; the budget, not the speed, sets the wall time, which is the point of the measurement. Timings
of trials under emulation mean nothing.

What it showed on the 2-core VM (2026-12-06, --budget 20m, one round; tune_hosts_at_once.txt/.json): one host 1242
s, both hosts at once 1326 s, x1.07 (one budget per host would be x2.00). The two guests (8 vCPUs each on 2 cores)
made every trial about twice as slow, so each host got 4-5 trials against 8 alone; the extra 7 % is the slower
host's tuner (1168 s against 1114 s alone) and the playbook's own tasks on two loaded guests. A budget under about
15 minutes can be refused by the budget planner after the baseline at that speed (it buys no verdict); the tuner on
the host also died once with SIGSEGV under that load (2026-12-05), so tune.yml starts it with PYTHONFAULTHANDLER=1
and the run's log keeps a traceback. Give it a machine with 4 or more free cores, or --budget 20m.

Usage: python benchmarks/tune_hosts_at_once.py [--budget 10m] [--rounds 1] [--disk D.qcow2] [--keep]
       [--out benchmarks/tune_hosts_at_once.out]
Writes <out>.json and <out>.txt atomically. Needs qemu-system-x86 and the converged lab disk (run
`pytest tests/lab/test_roles_on_lab.py` once after a roles change to make it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "lab"))  # the lab's wanted host and its playbook runner

from labkit import Lab, LabVars, converged_disks_dir, converged_record, short_tune_vars, wanted_lab_vars  # noqa: E402

from tuner.atomic import write_atomic  # noqa: E402
from tuner.lab.image import lab_cache_dir  # noqa: E402
from tuner.lab.instance import LabInstance  # noqa: E402
from tuner.lab.spec import ImageRecipe, MachineSpec  # noqa: E402
from tuner.model.default_model import default_model_path, models_dir  # noqa: E402
from tuner.model.tiny import tiny_model  # noqa: E402
from tuner.server.build import ensure_server  # noqa: E402

HOSTS = ("bench-a", "bench-b")
INSTALL_PLAYBOOK = """\
- name: Install llamahost from the controller's wheelhouse
  hosts: llama_hosts
  gather_facts: false
  become: true
  roles: [llamahost_tuner]
"""


def lab_vars(disk: Path | None, workdir: Path) -> tuple[LabVars, Path]:
    """The lab's variables (as tests/lab/conftest.py makes them: the stack's host vars, group_vars, host_vars) and
    the converged disk they key (or ``disk``: one saved for other playbooks, when only playbooks that site.yml does
    not run changed)."""
    split = tiny_model(models_dir() / "tiny", source=default_model_path(), shards=2)
    wanted = wanted_lab_vars(split, ensure_server("portable").binary, workdir)
    if disk is not None:
        if not disk.is_file():
            sys.exit(f"no lab disk at {disk}: name one in {converged_disks_dir()}, or leave --disk out")
        return wanted, disk
    if converged_record(wanted.key) is None:
        sys.exit(f"no converged lab disk for the current roles ({wanted.key}) in {converged_disks_dir()}: run "
                 "`pytest tests/lab/test_roles_on_lab.py` once to converge and save it, then run this again")
    return wanted, converged_disks_dir() / f"{wanted.key}.qcow2"


def boot(names: tuple[str, ...], disk: Path, inventory: Path, wanted: LabVars) -> list[Lab]:
    """Boot each lab host from ``disk`` and write one inventory holding all of them, as hosts of the lab's stack."""
    connections: dict[str, Any] = {}
    labs = []
    (inventory / "group_vars").mkdir(parents=True)
    (inventory / "host_vars").mkdir()
    (inventory / "group_vars" / "llama_hosts.yml").write_text(yaml.safe_dump(wanted.group_vars))
    for name in names:
        instance = LabInstance(lab_cache_dir(), name)
        state = instance.up(ImageRecipe(), MachineSpec(), disk=disk, progress=lambda m: print(f"lab: {m}", flush=True))
        connections.update(yaml.safe_load(instance.inventory.read_text())["llama_hosts"]["hosts"])
        (inventory / "host_vars" / f"{state.alias}.yml").write_text(yaml.safe_dump(wanted.host_vars))
        labs.append(Lab(instance, state, inventory, {}, lab_vars=wanted))
    (inventory / "hosts.yml").write_text(wanted.hosts_yaml(yaml.safe_dump({"llama_hosts": {"hosts": connections}})))
    return labs


def reset(labs: list[Lab]) -> None:
    """No run on any host: the next tune.yml starts a new one (with its full budget), with the lab's short
    workload."""
    for lab in labs:
        lab.ssh("sudo sh -c 'systemctl stop llamahost-tune 2>/dev/null; systemctl reset-failed llamahost-tune "
                "2>/dev/null; rm -rf /var/lib/llamahost/tune'")
        lab.put_short_workload()


def host_results(labs: list[Lab]) -> dict[str, Any]:
    """Each host's result from the run just ended: verdict, trials in its study, and the tuner's own wall time."""
    out: dict[str, Any] = {}
    for lab in labs:
        text = lab.ssh("sudo sh -c 'cat /var/lib/llamahost/tune/*/result.yaml 2>/dev/null || true'")
        result = yaml.safe_load(text) if text.strip() else None
        out[lab.state.alias] = None if result is None else {
            "verdict": result["verdict"], "study_trials": result["search"]["study_trials"],
            "tuner_wall_s": round(result["search"]["wall_seconds"], 1)}
    return out


def crashes(labs: list[Lab]) -> dict[str, str]:
    """What the guest kernel logged about a process that crashed (a tuner that died leaves no result)."""
    return {lab.state.alias: lab.ssh("sudo journalctl -k --no-pager -o cat | grep -i segfault | tail -n 3 || true",
                                     check=False).strip() for lab in labs}


def tune(labs: list[Lab], on: list[Lab], budget: str, wheelhouse: Path) -> dict[str, Any]:
    """tune.yml on ``on`` with a new run, timed; a host left without a result (its tuner died) is resumed the
    way a user would, by running the playbook again: the wall time then counts both runs."""
    reset(labs)
    limit = ",".join(lab.state.alias for lab in on)
    extra = {**short_tune_vars(budget, deadman_s=45), "tune_install": False,
             "llamahost_tuner_wheelhouse": str(wheelhouse)}
    seconds, resumed, crashed = 0.0, 0, {}
    for attempt in (1, 2):
        print(f"tune.yml on {limit} for {budget}" + (" (again: resume)" if attempt > 1 else "") + " ...", flush=True)
        run = labs[0].playbook("playbooks/tune.yml", "--limit", limit, extra_vars=extra)
        seconds += run.seconds
        if run.rc != 0:
            sys.exit(f"tune.yml on {limit} failed ({run.rc}):\n{run.output[-4000:]}")
        results = host_results(on)
        missing = [host for host, result in results.items() if result is None]
        if not missing:
            break
        crashed.update({host: text for host, text in crashes(on).items() if host in missing})
        print(f"  no result on {missing} after {run.seconds:.0f} s; kernel: {crashed}", flush=True)
        resumed += 1
    else:
        sys.exit(f"tune.yml on {limit} left no result on {missing}, twice:\n{run.output[-4000:]}")
    print(f"  {seconds:.0f} s: {results}", flush=True)
    return {"hosts": [lab.state.alias for lab in on], "wall_s": round(seconds, 1), "results": results,
            "resumed": resumed, "crashed": crashed}


def table(report: dict[str, Any]) -> str:
    lines = [f"tune.yml, budget {report['budget']} per run, {report['machine']}",
             f"install (llamahost_tuner on both hosts at once): {report['install_s']:.0f} s",
             "", "| round | hosts | wall s | trials per host | verdicts |", "|---|---|---|---|---|"]
    for number, one_round in enumerate(report["rounds"], 1):
        for run in one_round["runs"]:
            trials = ", ".join(str(r["study_trials"]) for r in run["results"].values())
            verdicts = ", ".join(r["verdict"] for r in run["results"].values())
            resumed = f" (resumed once: {', '.join(run['crashed'])} had no result)" if run["resumed"] else ""
            lines.append(f"| {number} | {len(run['hosts'])} | {run['wall_s']:.0f}{resumed} | {trials} | {verdicts} |")
    lines += ["", f"two hosts at once / one host, wall time: median x{report['ratio_median']:.2f} "
                  f"(rounds: {', '.join(f'x{r:.2f}' for r in report['ratios'])}); one budget per host would be x2.00"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="10m", help="tune_budget of every run (default 10m)")
    parser.add_argument("--rounds", type=int, default=1, help="one-host and two-host runs per round (default 1)")
    parser.add_argument("--disk", type=Path, help="a converged lab disk to boot (default: the current inputs' one)")
    parser.add_argument("--keep", action="store_true", help="leave both lab hosts running at the end")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "tune_hosts_at_once.out")
    args = parser.parse_args()
    if shutil.which("qemu-system-x86_64") is None:
        sys.exit("qemu-system-x86_64 is missing: `make system-deps` installs it")
    work = Path(tempfile.mkdtemp(prefix="tune-hosts-at-once-"))
    wanted, disk = lab_vars(args.disk, work)
    labs: list[Lab] = []
    try:
        labs = boot(HOSTS, disk, work / "inventory", wanted)
        wheelhouse = work / "wheelhouse"
        subprocess.run([str(Path(sys.executable).parent / "llamahost"), "wheelhouse", str(wheelhouse)], check=True)
        (work / "install.yml").write_text(INSTALL_PLAYBOOK)
        install = labs[0].playbook(str(work / "install.yml"),
                                   extra_vars={"llamahost_tuner_wheelhouse": str(wheelhouse)})
        if install.rc != 0:
            sys.exit(f"the install failed:\n{install.output[-4000:]}")
        rounds = []
        for number in range(args.rounds):
            scenarios = [labs[:1], labs] if number % 2 == 0 else [labs, labs[:1]]
            runs = [tune(labs, on, args.budget, wheelhouse) for on in scenarios]
            by_count = {len(run["hosts"]): run for run in runs}
            rounds.append({"runs": runs, "ratio": by_count[2]["wall_s"] / by_count[1]["wall_s"]})
        ratios = [one_round["ratio"] for one_round in rounds]
        report = {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                  "machine": f"{platform.node()}, {len(os.sched_getaffinity(0))} CPUs, two QEMU/TCG "
                             f"guests of {MachineSpec().cpus} vCPUs",
                  "budget": args.budget, "install_s": install.seconds, "rounds": rounds, "ratios": ratios,
                  "ratio_median": statistics.median(ratios)}
        write_atomic(args.out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
        write_atomic(args.out.with_suffix(".txt"), table(report))
        print(table(report))
    finally:
        if not args.keep:
            for name in HOSTS:
                LabInstance(lab_cache_dir(), name).down()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
