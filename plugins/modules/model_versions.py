#!/usr/bin/python3
"""Ansible module: keep each model in its own version directory, and prune the versions that no longer serve.

The role places a model under ``<llama_server_model_dir>/<version>/`` (the ``model_shards`` filter names the
version by the files' sha256), so a new model never overwrites the one that serves, and the role's rollback
restores a unit whose model is still on disk.

* ``state: adopted`` (before the model is placed): a file that is missing from its version directory but lies,
  with its pinned sha256, at its ``earlier_path`` (the flat layout of earlier releases of the role) is
  hard-linked into place, so an upgrade of the role does not fetch 230 GB again. A link and not a move: the unit
  that serves during the change still names the flat path, and a rollback may restore that unit. Both names
  share one copy on disk.
* ``state: pruned`` (once the new unit is healthy): the version directories other than ``serving`` are removed
  beyond the newest ``keep`` (by modification time); the flat names that are links to a version's file go too.
  Any other file in the model directory is not the role's to remove: it is reported as a warning and left.
"""

from __future__ import annotations

import os
import re
import shutil

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.llamahost.host.plugins.module_utils.model_files import fsync_directory, sha256_of

DOCUMENTATION = r"""
module: model_versions
short_description: Link a model of the flat layout into its version directory; prune versions that do not serve
options:
  state: {description: adopted (link earlier files into place) or pruned., type: str, required: true}
  files:
    description: "adopted: the model's files, each with path, sha256 and earlier_path."
    type: list
    elements: dict
    default: []
  directory: {description: "pruned: the model directory (llama_server_model_dir).", type: str, default: ""}
  serving: {description: "pruned: the version directory the healthy unit serves.", type: str, default: ""}
  keep: {description: "pruned: earlier versions to keep besides the serving one.", type: int, default: 0}
author: llamahost
"""

RETURN = r"""
adopted: {description: Paths linked into place from their earlier_path., returned: always, type: list}
removed: {description: Version directories and flat links removed., returned: always, type: list}
kept: {description: Earlier version directories kept for a rollback, newest first., returned: always, type: list}
left_alone: {description: Other files in the model directory, not removed., returned: always, type: list}
"""

VERSION_NAME = re.compile(r"^[0-9a-f]{16}$")


def adopt(module, files):
    """Link each file of the earlier layout into its version directory; the paths linked."""
    adopted = []
    for entry in files:
        path, earlier = entry["path"], entry.get("earlier_path") or ""
        if os.path.exists(path) or not earlier or not os.path.isfile(earlier):
            continue
        if sha256_of(earlier).hexdigest() != str(entry["sha256"]).lower():
            continue  # another model under the same name: fetched afresh, and the flat file left alone
        if not module.check_mode:
            os.link(earlier, path)
            fsync_directory(os.path.dirname(path))
        adopted.append(path)
    return adopted


def versions_in(directory):
    """The version directories in ``directory``, newest first."""
    found = [os.path.join(directory, name) for name in os.listdir(directory)
             if VERSION_NAME.match(name) and os.path.isdir(os.path.join(directory, name))]
    return sorted(found, key=lambda path: os.stat(path).st_mtime, reverse=True)


def inodes_in(directories):
    inodes = set()
    for directory in directories:
        for name in os.listdir(directory):
            stat = os.lstat(os.path.join(directory, name))
            inodes.add((stat.st_dev, stat.st_ino))
    return inodes


def prune(module, directory, serving, keep):
    """Remove the versions beyond ``keep`` and the flat links into any version; (removed, kept, left alone)."""
    if os.path.dirname(serving.rstrip("/")) != directory.rstrip("/") or not os.path.isdir(serving):
        module.fail_json(msg=f"{serving} is not a version directory in {directory}: nothing was removed")
    versions = versions_in(directory)
    linked = inodes_in(versions)
    earlier = [path for path in versions if os.path.realpath(path) != os.path.realpath(serving)]
    kept, gone = earlier[:keep], earlier[keep:]
    removed, left_alone = [], []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if path in versions or not os.path.isfile(path) or os.path.islink(path):
            continue
        stat = os.lstat(path)
        if (stat.st_dev, stat.st_ino) in linked:
            removed.append(path)
        else:
            left_alone.append(path)
    removed += gone
    if not module.check_mode:
        for path in removed:
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        if removed:
            fsync_directory(directory)
    return removed, kept, left_alone


def main():
    module = AnsibleModule(
        argument_spec={
            "state": {"type": "str", "required": True, "choices": ["adopted", "pruned"]},
            "files": {"type": "list", "elements": "dict", "default": []},
            "directory": {"type": "str", "default": ""},
            "serving": {"type": "str", "default": ""},
            "keep": {"type": "int", "default": 0},
        },
        required_if=[("state", "pruned", ("directory", "serving"))],
        supports_check_mode=True,
    )
    params = module.params
    directory = params["directory"].rstrip("/") or "/"
    result = {"changed": False, "adopted": [], "removed": [], "kept": [], "left_alone": []}
    if params["keep"] < 0:
        module.fail_json(msg=f"keep must be 0 or more, got {params['keep']}", **result)
    if params["state"] == "adopted":
        result["adopted"] = adopt(module, params["files"])
        result["changed"] = bool(result["adopted"])
        module.exit_json(**result)
    removed, kept, left_alone = prune(module, directory, params["serving"], params["keep"])
    result.update(changed=bool(removed), removed=removed, kept=kept, left_alone=left_alone)
    if left_alone:
        module.warn(f"{len(left_alone)} file(s) in {directory} belong to no model version and were left "
                    f"alone: {', '.join(left_alone)}; remove them if no service needs them")
    module.exit_json(**result)


if __name__ == "__main__":
    main()
