"""The result file: what was proven, in llama.cpp's terms, for people and for the playbook.

One YAML document per study, written atomically with the previous version kept as ``.prev``. It holds
the configuration to run (the proven winner, or the baseline when no candidate was significantly
better), its pp/tg throughput with confidence intervals next to the baseline's, the improvement with its
interval, the fraction of the bandwidth roofline reached, and everything needed to know whether the
numbers still apply: host fingerprint, llama.cpp build, model sha256, workload.
"""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from tuner import __version__
from tuner.atomic import write_atomic
from tuner.errors import UserError

FORMAT_VERSION = 1
IMPROVED = "improved"
BASELINE_STANDS = "baseline-stands"


def _yaml() -> YAML:
    yaml = YAML(typ="rt")  # round-trip mode keeps the order the fields were written in
    yaml.default_flow_style = False
    yaml.width = 120
    return yaml


def _plain(value: Any) -> Any:
    """YAML-safe copy: tuples become lists, floats are rounded for people (raw samples keep 4 digits)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return round(value, 4)
    return value


def dump_yaml(data: dict[str, Any]) -> str:
    buffer = io.StringIO()
    _yaml().dump(_plain(data), buffer)
    return buffer.getvalue()


def write_result(path: Path, data: dict[str, Any]) -> None:
    header = ("# llamahost tuning result. Apply `settings.role_vars` through the llama_server role, or pass\n"
              "# `settings.server_args` to llama-server. Written atomically; the previous file is kept as .prev.\n")
    write_atomic(path, header + dump_yaml(data))


def load_result(path: Path) -> dict[str, Any]:
    try:
        data = _yaml().load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no result file at {path}", "run `llamahost tune` first") from None
    except Exception as exc:
        raise UserError(f"{path} is not a readable result file ({exc})",
                        "restore it from its .prev copy or run `llamahost tune` again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        raise UserError(f"{path} is not a llamahost result file (format {FORMAT_VERSION})",
                        "pass a file written by `llamahost tune`")
    return data


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def version_block(system_info: str) -> dict[str, Any]:
    import llama_cpp

    return {"llamahost": __version__, "llama_cpp_python": llama_cpp.__version__, "system_info": system_info}
