#!/usr/bin/python3
"""Ansible module: set /sys values now and at every boot (systemd-tmpfiles ``w`` lines), with check/diff.

No Ansible module writes /sys, and ``copy``/``lineinfile`` cannot (they rename a temporary file over the
target). This module follows the lifecycle of tuned's plugins: read the current value, write only what
differs, read it back, and report before/after so nothing is changed blindly. The same values go into
one ``tmpfiles.d`` file per role, which systemd applies early at boot, before services start.

Values a kernel shows as a choice list (``always [madvise] never``) are compared by their selected
entry. A path that does not exist (no cpufreq in a VM) is reported in ``missing`` when the setting is
``optional`` (a warning for the role, not a crash) and is an error otherwise. The module does not fail
when the kernel accepts a write but reads back a different value (hugepages short of memory): it
reports ``mismatched`` and lets the role fail with the numbers that matter to it.
"""

from __future__ import annotations

import os
import re
import tempfile

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: sysfs_settings
short_description: Apply /sys values at runtime and persist them as systemd-tmpfiles w lines
options:
  settings:
    description: Values to set, in order.
    type: list
    elements: dict
    required: true
    suboptions:
      path: {description: Absolute /sys path., type: str, required: true}
      value: {description: Wanted value., type: str, required: true}
      optional: {description: Skip with a warning when the path does not exist., type: bool, default: false}
  persist_file:
    description: tmpfiles.d file that holds exactly these settings; empty to only apply at runtime.
    type: str
    default: ""
  header:
    description: Comment written at the top of I(persist_file).
    type: str
    default: "Managed by Ansible (llamahost); applied by systemd-tmpfiles at boot."
author: llamahost
"""

RETURN = r"""
settings:
  description: One entry per setting with path, wanted, before, after, changed, missing.
  returned: always
  type: list
missing:
  description: Optional paths that do not exist on this host.
  returned: always
  type: list
mismatched:
  description: Paths whose read-back value differs from the wanted one after writing.
  returned: always
  type: list
"""


def selected(text):
    match = re.search(r"\[([^\]]+)\]", text)
    return match.group(1) if match else text.strip()


def read_value(path):
    with open(path) as handle:
        return selected(handle.read())


def write_value(path, value):
    with open(path, "w") as handle:
        handle.write(value)


def tmpfiles_text(header, settings):
    lines = [f"# {header}"]
    for setting in settings:
        if re.search(r"\s", setting["path"]) or "\n" in setting["value"]:
            raise ValueError(f"cannot persist {setting['path']!r} = {setting['value']!r}: whitespace")
        lines.append(f"w {setting['path']} - - - - {setting['value']}")
    return "\n".join(lines) + "\n"


def read_file(path):
    try:
        with open(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


def write_file_atomically(path, text):
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def apply_settings(module, settings):
    results, missing, mismatched, diff_before, diff_after = [], [], [], [], []
    for setting in settings:
        path, wanted = setting["path"], str(setting["value"]).strip()
        entry = {"path": path, "wanted": wanted, "before": None, "after": None, "changed": False,
                 "missing": False}
        if not os.path.exists(path):
            if not setting["optional"]:
                module.fail_json(msg=f"{path} does not exist on this host, so it cannot be set to {wanted!r}")
            entry["missing"] = True
            missing.append(path)
            results.append(entry)
            continue
        before = read_value(path)
        entry["before"] = entry["after"] = before
        if before != wanted:
            entry["changed"] = True
            diff_before.append(f"{path} = {before}")
            diff_after.append(f"{path} = {wanted}")
            if not module.check_mode:
                try:
                    write_value(path, wanted)
                except OSError as exc:
                    module.fail_json(msg=f"the kernel refused {wanted!r} for {path}: {exc.strerror}",
                                     settings=results)
                entry["after"] = read_value(path)
                if entry["after"] != wanted:
                    mismatched.append(path)
        results.append(entry)
    return results, missing, mismatched, diff_before, diff_after


def main():
    module = AnsibleModule(
        argument_spec={
            "settings": {"type": "list", "elements": "dict", "required": True, "options": {
                "path": {"type": "str", "required": True},
                "value": {"type": "str", "required": True},
                "optional": {"type": "bool", "default": False},
            }},
            "persist_file": {"type": "str", "default": ""},
            "header": {"type": "str",
                       "default": "Managed by Ansible (llamahost); applied by systemd-tmpfiles at boot."},
        },
        supports_check_mode=True,
    )
    settings = module.params["settings"]
    results, missing, mismatched, diff_before, diff_after = apply_settings(module, settings)
    changed = any(entry["changed"] for entry in results)
    diffs = []
    if diff_before:
        diffs.append({"before_header": "live /sys values", "after_header": "live /sys values",
                      "before": "\n".join(diff_before) + "\n", "after": "\n".join(diff_after) + "\n"})

    persist_file = module.params["persist_file"]
    if persist_file:
        persisted = [s for s in settings if s["path"] not in missing]
        try:
            wanted_text = tmpfiles_text(module.params["header"], persisted)
        except ValueError as exc:
            module.fail_json(msg=str(exc))
        current_text = read_file(persist_file)
        if current_text != wanted_text:
            changed = True
            diffs.append({"before_header": persist_file, "after_header": persist_file,
                          "before": current_text, "after": wanted_text})
            if not module.check_mode:
                write_file_atomically(persist_file, wanted_text)

    for path in missing:
        module.warn(f"{path} does not exist on this host (not supported here); left as it is")
    module.exit_json(changed=changed, settings=results, missing=missing, mismatched=mismatched, diff=diffs)


if __name__ == "__main__":
    main()
