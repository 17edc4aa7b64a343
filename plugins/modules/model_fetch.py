#!/usr/bin/python3
"""Ansible module: place a model's files (one GGUF or every shard of a split one) from URLs, resumably.

``get_url`` starts a 50 GB download again from zero after any interruption, stages it in the remote
temporary directory (often the small root disk) and learns only at the end that the volume is full. This
module, for every file of the model at once:

* ``state: checked`` (validation, writes nothing): learns each missing file's size (``Content-Length`` of
  a HEAD request, or ``size`` when the caller knows it, as for a controller copy) and refuses when the
  volume that will hold the files has less room than they need, before the first byte is written;
* ``state: present``: keeps a file whose sha256 is right; downloads any other to ``<path>.part`` beside
  it, resuming a partial ``.part`` with an HTTP range request, checks the sha256, then reads it as a GGUF
  model with the tuner's own reader (``module_utils/gguf_reader``: a whole header, every tensor inside the
  file, the shard in its place, an architecture in the first), and only then renames it into place
  (fsynced). A wrong download is deleted; an interrupted one is kept for the next run. A pinned sha256
  proves the bytes are the ones pinned, not that they are a model llama.cpp can load: a truncated upload or
  a mislabelled shard has a sha256 too, and the unit must not point to it.

An ``s3://bucket/key`` URL is fetched with the host's own AWS credentials (on EC2, the instance role): each
request goes to a URL presigned for that one method by botocore on the host, so the download takes the same
resumable path and neither the controller nor a transfer bucket sees the bytes. A presigned URL outlives no
credential, so every request (the HEAD, each resumed GET) is signed afresh. Without botocore on the host
(``python3-botocore``; the stack's hosts get it at first boot, the role installs it before downloading) the
room check of an S3 model waits for the download: ``state: checked`` returns those paths as ``unchecked``.
"""

from __future__ import annotations

import hashlib
import os

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.urls import open_url
from ansible_collections.llamahost.host.plugins.module_utils.model_files import CHUNK, fsync_directory, sha256_of
from ansible_collections.llamahost.host.plugins.module_utils.gguf_reader import model_file_problem

DOCUMENTATION = r"""
module: model_fetch
short_description: Check room for, and resumably download and verify, a model's GGUF files
options:
  files:
    description: >-
      The files, in shard order; each has path and sha256, and url (to download) or size (bytes), and may have
      earlier_path (the same file in the flat layout of earlier releases, which needs no room when checking).
    type: list
    elements: dict
    required: true
  state: {description: checked (room only, no writes) or present., type: str, default: present}
  timeout: {description: Seconds to wait for a stalled connection., type: int, default: 60}
  s3_region: {description: "Region that signs s3:// requests; empty: botocore's own chain (env, config, EC2).",
              type: str, default: ""}
author: llamahost
extends_documentation_fragment: [files]
"""

RETURN = r"""
downloaded: {description: Paths that were written., returned: always, type: list}
resumed: {description: Bytes of each path that a partial download already held., returned: always, type: dict}
needed_bytes: {description: Bytes the missing files still need on the volume., returned: always, type: int}
free_bytes: {description: Bytes free for root on that volume., returned: always, type: int}
unchecked: {description: "Paths of s3:// files whose size is unknown without botocore (checked state).",
            returned: always, type: list}
"""

S3_SCHEME = "s3://"
# Long enough for one request to start; a resumed or later request is signed again.
PRESIGNED_SECONDS = 900


def is_s3(url):
    return url.startswith(S3_SCHEME)


def botocore_available():
    try:
        import botocore.session  # noqa: F401
    except ImportError:
        return False
    return True


def presign(module, url, method):
    """An HTTPS URL for one ``method`` (HEAD or GET) on ``url``; an ``s3://`` URL is presigned with the host's
    credentials, any other is returned as it is."""
    if not is_s3(url):
        return url
    if not botocore_available():
        module.fail_json(msg=f"{url} is fetched with the host's AWS credentials, which needs botocore on the "
                             "host: install python3-botocore, or name an https:// URL")
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    bucket, _, key = url[len(S3_SCHEME):].partition("/")
    session = botocore.session.get_session()
    # SigV4 signs for one region, and botocore takes none from EC2's metadata: the caller names it.
    region = module.params["s3_region"] or session.get_config_variable("region")
    try:
        if not region:
            raise ValueError("no region to sign for: set llama_server_model_s3_region to the bucket's region")
        client = session.create_client("s3", region_name=region, config=Config(signature_version="s3v4"))
        if session.get_credentials() is None:
            raise ValueError("no AWS credentials on the host (on EC2: an instance profile that may read it)")
        return client.generate_presigned_url("head_object" if method == "HEAD" else "get_object",
                                             Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGNED_SECONDS)
    except (BotoCoreError, ValueError) as exc:
        module.fail_json(msg=f"cannot sign a request for {url}: {exc}")


def nearest_existing(path):
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def free_bytes(directory):
    stat = os.statvfs(nearest_existing(directory))
    return stat.f_bavail * stat.f_frsize


def size_on_disk(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def remote_size(module, url, timeout):
    try:
        response = open_url(presign(module, url, "HEAD"), method="HEAD", timeout=timeout, follow_redirects="all")
        length = response.headers.get("Content-Length")
    except Exception as exc:  # noqa: BLE001 - any failure to reach the URL is reported the same way
        grant = " and that the host's AWS role may read it (s3:GetObject)" if is_s3(url) else ""
        module.fail_json(msg=f"cannot reach {url}: {exc}; check the URL{grant} and that the host can reach it")
    if length is None or not str(length).isdigit():
        module.fail_json(msg=f"{url} does not say its size (no Content-Length on HEAD), so the free space on the "
                             "model volume cannot be checked before downloading; serve it with a Content-Length")
    return int(length)


def download(module, entry, place, timeout):
    """Download ``entry`` into ``<path>.part`` (resuming it), check it as shard ``place`` (number, count),
    rename it into place. Returns the bytes that a partial download already held."""
    path, url, wanted = entry["path"], entry["url"], entry["sha256"].lower()
    part = path + ".part"
    have = size_on_disk(part)
    digest = sha256_of(part) if have else hashlib.sha256()
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        response = open_url(presign(module, url, "GET"), headers=headers, timeout=timeout,
                            follow_redirects="all")
    except Exception as exc:  # noqa: BLE001
        if have and getattr(exc, "code", None) == 416:  # the part is already whole
            response = None
        else:
            module.fail_json(msg=f"cannot download {url}: {exc}; check the URL (the {have} bytes already "
                                 f"downloaded to {part} are kept for the next run)")
    resumed = have
    if response is not None:
        if have and response.getcode() != 206:  # the server ignored the range: start again
            digest, resumed = hashlib.sha256(), 0
            mode = "wb"
        else:
            mode = "ab" if have else "wb"
        written = resumed
        with open(part, mode) as handle:
            try:
                while True:
                    block = response.read(CHUNK)
                    if not block:
                        break
                    handle.write(block)
                    digest.update(block)
                    written += len(block)
            except Exception as exc:  # noqa: BLE001 - a dropped connection: keep the part, resume next run
                handle.flush()
                os.fsync(handle.fileno())
                module.fail_json(msg=f"the download of {url} stopped after {written} bytes ({exc}); run the play "
                                     f"again to resume from {part}")
            handle.flush()
            os.fsync(handle.fileno())
        # A connection closed early ends the body without an error: compare with what the server announced.
        length = response.headers.get("Content-Length")
        if length is not None and str(length).isdigit() and written < resumed + int(length):
            module.fail_json(msg=f"the download of {url} stopped after {written} of {resumed + int(length)} bytes; "
                                 f"run the play again to resume from {part}")
    got = digest.hexdigest()
    if got != wanted:
        os.unlink(part)
        module.fail_json(msg=f"{url} has sha256 {got}, not the pinned {wanted} (llama_server_model_sha256): the "
                             "download was deleted; pin the right digest or fix the URL")
    problem = model_file_problem(part, *place)
    if problem is not None:
        os.unlink(part)
        module.fail_json(msg=f"{url} matches its pinned sha256 but is not a model llama.cpp can load: "
                             f"{problem.message}. The download was deleted. The pinned file itself is wrong "
                             f"({problem.fix}): pin the URL and sha256 of the model as published")
    os.replace(part, path)
    fsync_directory(os.path.dirname(path))
    return resumed


def main():
    module = AnsibleModule(
        argument_spec={
            "files": {"type": "list", "elements": "dict", "required": True},
            "state": {"type": "str", "default": "present", "choices": ["checked", "present"]},
            "timeout": {"type": "int", "default": 60},
            "s3_region": {"type": "str", "default": ""},
        },
        add_file_common_args=True,
        supports_check_mode=True,
    )
    files, state, timeout = module.params["files"], module.params["state"], module.params["timeout"]
    for entry in files:
        if not entry.get("path") or not (entry.get("url") or entry.get("size") is not None):
            module.fail_json(msg=f"each file needs a path and a url or a size, got {entry}")
    directory = os.path.dirname(files[0]["path"])
    # A file in place stays: when checking, on trust (its sha256 is checked when it is placed); when
    # placing, only if its sha256 is the pinned one. A file of the earlier flat layout needs no room either:
    # the model_versions module links it into place. The others need room: a partial download only the rest.
    pending = [entry for entry in files
               if not (os.path.exists(entry["path"])
                       and (state == "checked" or sha256_of(entry["path"]).hexdigest() == entry["sha256"].lower()))
               and not (state == "checked" and entry.get("earlier_path") and os.path.isfile(entry["earlier_path"]))]
    needed = 0
    # Checking only: without botocore an S3 file's size waits for the download, which checks room first.
    unchecked = [entry["path"] for entry in pending
                 if state == "checked" and entry.get("url") and is_s3(entry["url"]) and not botocore_available()]
    for entry in pending:
        if entry["path"] in unchecked:
            continue
        size = int(entry["size"]) if entry.get("size") is not None else remote_size(module, entry["url"], timeout)
        needed += max(0, size - size_on_disk(entry["path"] + ".part"))
    room = free_bytes(directory)
    result = {"changed": False, "downloaded": [], "resumed": {}, "needed_bytes": needed, "free_bytes": room,
              "unchecked": unchecked}
    if needed > room:
        module.fail_json(msg=f"the model needs {needed} more bytes in {directory}, but its volume has {room} free: "
                             "make room, or give the model a larger volume (llama_server_model_dir)", **result)
    if state == "checked":
        module.exit_json(**result)
    places = {entry["path"]: (number, len(files)) for number, entry in enumerate(files, start=1)}
    for entry in pending:
        if not entry.get("url"):
            module.fail_json(msg=f"{entry['path']} is missing or not the pinned sha256, and has no url to fetch "
                                 "it from", **result)
        if not module.check_mode:
            result["resumed"][entry["path"]] = download(module, entry, places[entry["path"]], timeout)
        result["downloaded"].append(entry["path"])
        result["changed"] = True
    for entry in files:
        if os.path.exists(entry["path"]):
            file_args = module.load_file_common_arguments(module.params, path=entry["path"])
            result["changed"] = module.set_fs_attributes_if_different(file_args, result["changed"])
    module.exit_json(**result)


if __name__ == "__main__":
    main()
