"""The llama_server role's model files, without the lab. Fast.

* The ``model_shards`` filters name every shard of a split GGUF from its first one, and say what is wrong
  with a source and its sha256 list.
* The role's own validate_model and model tasks, run by real Ansible on localhost, place a split model from
  the controller and from a URL, and refuse one whose shards disagree with the pinned digests.
* The ``model_fetch`` module, run as Ansible runs it, against a real HTTP server on loopback that honours
  range requests and can drop a connection mid-file: it checks room before writing, resumes an interrupted
  download, checks sha256 and then reads each file as a GGUF model (a whole header, every tensor inside the
  file, each shard in its place), keeps files already in place, and writes nothing in check mode.
  The same server stands in for S3's endpoint (``AWS_ENDPOINT_URL_S3``), so an ``s3://`` model takes the
  module's real path: every request presigned by botocore with the host's credentials, for its own method.
  S3 itself cannot be reached from here: what AWS does with the signature is not tested.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import yaml
from role_support import BIN, PLUGINS, ROLE, load_plugin, run_module, run_playbook

from tuner.model.checksum import cached_sha256
from tuner.model.gguf_file import inspect_model

SHARDS = load_plugin(PLUGINS / "filter" / "model_shards.py")
FETCH = PLUGINS / "modules" / "model_fetch.py"
VERSIONS = PLUGINS / "modules" / "model_versions.py"
MIB = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- naming the shards ------------------------------------------------------------------------------------

def test_a_split_model_is_named_by_its_first_shard_and_keeps_a_urls_query() -> None:
    url = "https://mirror.example/m/Llama-70B-Q4_K_M-00001-of-00003.gguf?download=true"
    shards = SHARDS.model_shards(url, ["AA" * 32, "bb" * 32, "cc" * 32], "/srv/models")
    assert [s["name"] for s in shards] == [f"Llama-70B-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert shards[1]["source"] == "https://mirror.example/m/Llama-70B-Q4_K_M-00002-of-00003.gguf?download=true"
    version = SHARDS.model_version(["aa" * 32, "bb" * 32, "cc" * 32])
    assert [s["path"] for s in shards] == [f"/srv/models/{version}/{s['name']}" for s in shards]
    assert shards[0]["earlier_path"] == "/srv/models/Llama-70B-Q4_K_M-00001-of-00003.gguf"
    assert shards[0]["sha256"] == "aa" * 32
    (single,) = SHARDS.model_shards("/models/m.gguf", "AB" * 32, "/srv/models/", "served.gguf")
    assert single == {"name": "served.gguf", "source": "/models/m.gguf", "sha256": "ab" * 32,
                      "path": f"/srv/models/{'ab' * 8}/served.gguf", "earlier_path": "/srv/models/served.gguf"}


def test_each_model_has_its_own_version_directory_named_by_its_content() -> None:
    """A one-file model's version is its own sha256 (cut to 16 digits); a split model's changes with any shard,
    and with their order; the same digests in any case are the same version."""
    first, second = "ab" * 32, "cd" * 32
    assert SHARDS.model_version(first) == SHARDS.model_version([first.upper()]) == first[:16]
    split = SHARDS.model_version([first, second])
    assert len(split) == 16 and split not in (first[:16], second[:16])
    assert split != SHARDS.model_version([second, first]) and split != SHARDS.model_version([first, "ce" * 32])
    assert split == SHARDS.model_version([first.upper(), second])


@pytest.mark.parametrize(
    ("source", "sha256", "name", "problem"),
    [
        ("/m/x-00001-of-00003.gguf", ["ab" * 32, "cd" * 32], "", "must list 3 sha256 digests"),
        ("/m/x.gguf", ["ab" * 32, "cd" * 32], "", "but /m/x.gguf is one file"),
        ("/m/x.gguf", "xyz", "", "64-hex-digit"),
        ("/m/x.gguf", "", "", "64-hex-digit"),
        ("/m/x-00001-of-00002.gguf", ["ab" * 32, "cd" * 32], "renamed.gguf", "must end in -00001-of-00002.gguf"),
    ],
)
def test_a_source_and_its_digests_that_disagree_are_named(source: str, sha256: Any, name: str, problem: str) -> None:
    problems = SHARDS.model_shard_problems(source, sha256, name)
    assert any(problem in p for p in problems), problems


def test_a_consistent_split_model_has_no_problems() -> None:
    assert SHARDS.model_shard_problems("/m/x-00001-of-00002.gguf", ["ab" * 32, "CD" * 32], "") == []
    assert SHARDS.model_shard_problems("/m/x.gguf", "ab" * 32, "y.gguf") == []


# ---- fetching them ----------------------------------------------------------------------------------------

class ModelMirror(ThreadingHTTPServer):
    """Serves ``files`` by name with HEAD and range GETs; ``drop_after[name]`` bytes, once, then hangs up."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), MirrorHandler)
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}
        self.ranges: list[str] = []
        self.gets = 0
        self.queries: list[tuple[str, dict[str, str]]] = []  # (method, query) of each request that had one

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class MirrorHandler(BaseHTTPRequestHandler):
    server: ModelMirror

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def name(self) -> str:
        """The requested file; a query (an S3 presigned URL's signature) is recorded, not part of the name."""
        path, _, query = self.path.partition("?")
        if query:
            self.server.queries.append((self.command, dict(urllib.parse.parse_qsl(query))))
        return urllib.parse.unquote(path.lstrip("/"))

    def do_HEAD(self) -> None:
        data = self.server.files.get(self.name())
        self.send_response(404 if data is None else 200)
        self.send_header("Content-Length", str(0 if data is None else len(data)))
        self.end_headers()

    def do_GET(self) -> None:
        name = self.name()
        data = self.server.files.get(name)
        self.server.gets += 1
        if data is None:
            self.send_error(404)
            return
        start = 0
        if "Range" in self.headers:
            self.server.ranges.append(self.headers["Range"])
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        cut = self.server.drop_after.pop(name, None)
        self.wfile.write(data[start:] if cut is None else data[start:cut])
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True


@pytest.fixture
def mirror() -> Iterator[ModelMirror]:
    server = ModelMirror()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def gguf_bytes(size: int, seed: int, number: int = 1, count: int = 1) -> bytes:
    """A real GGUF file of exactly ``size`` bytes: shard ``number`` of ``count`` as gguf-split writes them (the
    architecture in the first), one F32 tensor filling half of it, zeros after it (which llama.cpp ignores)."""
    path = Path(tempfile.mkdtemp()) / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama" if number == 1 else "")  # "" writes no architecture
    if count > 1:
        writer.add_uint16("split.no", number - 1)
        writer.add_uint16("split.count", count)
    elements = size // 8 // 32 * 32
    writer.add_tensor(f"blk.{seed}.weight", np.random.default_rng(seed).random(elements, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    shutil.rmtree(path.parent)
    assert len(data) <= size
    return data + bytes(size - len(data))


def split_model(mirror: ModelMirror, target: Path) -> list[dict[str, Any]]:
    files = []
    for number in (1, 2):
        name = f"m-0000{number}-of-00002.gguf"
        mirror.files[name] = gguf_bytes(3 * MIB if number == 1 else MIB, number, number, 2)
        files.append({"path": str(target / name), "url": mirror.url(name), "sha256": sha(mirror.files[name])})
    return files


def test_an_interrupted_split_download_resumes_and_lands_whole(mirror: ModelMirror, tmp_path: Path) -> None:
    target = tmp_path / "models"
    target.mkdir()
    files = split_model(mirror, target)
    first = Path(files[0]["path"])
    mirror.drop_after["m-00001-of-00002.gguf"] = MIB + 123
    stopped = run_module(FETCH, {"files": files, "mode": "0640"}, tmp_path)
    assert stopped.get("failed") and "run the play again to resume" in stopped["msg"], stopped
    part = Path(f"{first}.part")
    assert part.stat().st_size == MIB + 123 and not first.exists()

    done = run_module(FETCH, {"files": files, "mode": "0640"}, tmp_path)
    assert not done.get("failed") and done["changed"], done
    assert mirror.ranges == [f"bytes={MIB + 123}-"]  # the second run asked only for the rest
    assert done["resumed"][str(first)] == MIB + 123
    for entry in files:
        placed = Path(entry["path"])
        assert sha(placed.read_bytes()) == entry["sha256"] and oct(placed.stat().st_mode & 0o777) == "0o640"
    assert not part.exists()

    gets = mirror.gets
    again = run_module(FETCH, {"files": files, "mode": "0640"}, tmp_path)
    assert not again.get("failed") and not again["changed"] and mirror.gets == gets  # in place: nothing fetched


def fetch_pinned(mirror: ModelMirror, tmp_path: Path, name: str, data: bytes, place: str = "m.gguf",
                 count: int = 1) -> dict[str, Any]:
    """Serve ``data`` as ``name``, pin its own sha256, and fetch it (with ``count - 1`` good shards after it)."""
    mirror.files[name] = data
    files = [{"path": str(tmp_path / place), "url": mirror.url(name), "sha256": sha(data)}]
    for number in range(2, count + 1):
        later = place.replace("-00001-", f"-{number:05d}-")
        mirror.files[later] = gguf_bytes(MIB, number, number, count)
        files.append({"path": str(tmp_path / later), "url": mirror.url(later), "sha256": sha(mirror.files[later])})
    return run_module(FETCH, {"files": files}, tmp_path)


def test_a_download_with_the_wrong_sha256_or_no_gguf_magic_is_deleted(mirror: ModelMirror, tmp_path: Path) -> None:
    mirror.files["m.gguf"] = gguf_bytes(MIB, 3)
    wrong = run_module(FETCH, {"files": [{"path": str(tmp_path / "m.gguf"), "url": mirror.url("m.gguf"),
                                          "sha256": "ab" * 32}]}, tmp_path)
    assert wrong.get("failed") and f"not the pinned {'ab' * 32}" in wrong["msg"], wrong
    html = fetch_pinned(mirror, tmp_path, "page.html", b"<html>not a model</html>")
    assert html.get("failed") and "not a GGUF file" in html["msg"] and "was deleted" in html["msg"], html
    assert sorted(p.name for p in tmp_path.iterdir()) == ["args.json"]  # no file, no part left behind


def test_a_pinned_file_that_is_not_a_loadable_model_is_deleted_before_the_unit_can_point_to_it(
        mirror: ModelMirror, tmp_path: Path) -> None:
    """The sha256 proves the bytes are the pinned ones, not that they are a model: a truncated upload, a shard
    under another shard's name, or a first shard with no architecture each has a sha256 of its own."""
    whole = gguf_bytes(2 * MIB, 4)
    cut = fetch_pinned(mirror, tmp_path, "cut.gguf", whole[:MIB])
    assert cut.get("failed") and "past the end of the file" in cut["msg"] and "truncated" in cut["msg"], cut

    second = gguf_bytes(MIB, 5, 2, 2)  # shard 2's bytes, published under shard 1's name
    swapped = fetch_pinned(mirror, tmp_path, "s-00001-of-00002.gguf", second, "s-00001-of-00002.gguf", count=2)
    assert swapped.get("failed") and "shard 1 of 2 says it is shard 2 of 2" in swapped["msg"], swapped

    mixed = fetch_pinned(mirror, tmp_path, "x-00001-of-00002.gguf", gguf_bytes(MIB, 6, 1, 3),
                         "x-00001-of-00002.gguf", count=2)
    assert mixed.get("failed") and "says it is shard 1 of 3" in mixed["msg"], mixed

    headless = gguf_bytes(MIB, 7, 2, 1)  # a whole file without general.architecture
    no_arch = fetch_pinned(mirror, tmp_path, "noarch.gguf", headless)
    assert no_arch.get("failed") and "no general.architecture" in no_arch["msg"], no_arch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["args.json"]  # nothing placed, no part kept

    fine = fetch_pinned(mirror, tmp_path, "ok.gguf", whole)
    assert not fine.get("failed") and (tmp_path / "m.gguf").read_bytes() == whole, fine


def test_room_is_checked_before_the_first_byte(mirror: ModelMirror, tmp_path: Path) -> None:
    target = tmp_path / "models" / "not-yet-created"
    files = split_model(mirror, target)
    checked = run_module(FETCH, {"files": files, "state": "checked"}, tmp_path)
    assert not checked.get("failed") and checked["needed_bytes"] == 4 * MIB, checked  # sizes from HEAD
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    too_big = [{"path": str(target / "huge.gguf"), "sha256": "ab" * 32, "size": free + 10 * MIB}]
    refused = run_module(FETCH, {"files": too_big, "state": "checked"}, tmp_path)
    assert refused.get("failed") and "more bytes in" in refused["msg"] and "llama_server_model_dir" in refused["msg"]
    refused = run_module(FETCH, {"files": [{**too_big[0], "url": mirror.url("m-00001-of-00002.gguf")}]}, tmp_path)
    assert refused.get("failed") and "more bytes in" in refused["msg"]
    assert not target.exists() and mirror.gets == 0


def test_a_file_of_the_earlier_flat_layout_needs_no_room(mirror: ModelMirror, tmp_path: Path) -> None:
    """The role links such a file into its version directory: counting it would refuse an upgrade of a host
    whose volume holds the one model it serves."""
    target = tmp_path / "models" / ("ab" * 8)
    files = split_model(mirror, target)
    flat = tmp_path / "models" / Path(files[0]["path"]).name
    flat.parent.mkdir(parents=True)
    flat.write_bytes(mirror.files[flat.name])
    checked = run_module(FETCH, {"files": [{**f, "earlier_path": str(tmp_path / "models" / Path(f["path"]).name)}
                                           for f in files], "state": "checked"}, tmp_path)
    assert not checked.get("failed") and checked["needed_bytes"] == 1 * MIB, checked  # the second shard only


# ---- model versions: the flat layout adopted, the versions that no longer serve pruned ----------------------

def flat_model(directory: Path, data: bytes, name: str = "m.gguf") -> dict[str, str]:
    """A model file placed flat in ``directory`` as earlier releases did; its entry for the adopted state."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(data)
    version = directory / sha(data)[:16]
    version.mkdir()
    return {"path": str(version / name), "sha256": sha(data), "earlier_path": str(directory / name)}


def test_a_flat_model_with_its_pinned_sha256_is_linked_into_its_version(tmp_path: Path) -> None:
    models = tmp_path / "models"
    entry = flat_model(models, b"GGUF the served model")
    dry = run_module(VERSIONS, {"state": "adopted", "files": [entry]}, tmp_path, check_mode=True)
    assert dry["changed"] and dry["adopted"] == [entry["path"]] and not Path(entry["path"]).exists()
    done = run_module(VERSIONS, {"state": "adopted", "files": [entry]}, tmp_path)
    assert done["changed"] and done["adopted"] == [entry["path"]], done
    assert Path(entry["path"]).samefile(entry["earlier_path"])  # one copy on disk, both names (a rollback's too)
    again = run_module(VERSIONS, {"state": "adopted", "files": [entry]}, tmp_path)
    assert not again["changed"] and again["adopted"] == []


def test_a_flat_file_with_another_sha256_is_not_adopted(tmp_path: Path) -> None:
    models = tmp_path / "models"
    entry = {**flat_model(models, b"GGUF an older model, same name"), "sha256": sha(b"GGUF the pinned model")}
    done = run_module(VERSIONS, {"state": "adopted", "files": [entry]}, tmp_path)
    assert not done["changed"] and not Path(entry["path"]).exists()
    assert Path(entry["earlier_path"]).read_bytes() == b"GGUF an older model, same name"


def versions_dir(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A model directory with three versions, oldest first (the last serves), the serving file's flat name,
    and one file that no version holds."""
    models = tmp_path / "models"
    versions = []
    for age, name in enumerate(("1111111111111111", "2222222222222222", "3333333333333333")):
        version = models / name
        version.mkdir(parents=True)
        (version / "m.gguf").write_bytes(name.encode())
        os.utime(version, (1_000_000 + age * 1000, 1_000_000 + age * 1000))
        versions.append(version)
    os.link(versions[-1] / "m.gguf", models / "m.gguf")
    (models / "notes.gguf").write_bytes(b"someone else's file")
    return models, versions


@pytest.mark.parametrize(("keep", "kept"), [(0, []), (1, ["2222222222222222"]), (5, ["2222222222222222",
                                                                                      "1111111111111111"])])
def test_versions_beyond_the_count_and_the_flat_links_go_once_a_new_one_serves(tmp_path: Path, keep: int,
                                                                               kept: list[str]) -> None:
    models, versions = versions_dir(tmp_path)
    args = {"state": "pruned", "directory": str(models), "serving": str(versions[-1]), "keep": keep}
    dry = run_module(VERSIONS, args, tmp_path, check_mode=True)
    assert dry["changed"] and all(v.exists() for v in versions) and (models / "m.gguf").exists()
    done = run_module(VERSIONS, args, tmp_path)
    assert [Path(p).name for p in done["kept"]] == kept, done
    assert sorted(p.name for p in models.iterdir()) == sorted([*kept, "3333333333333333", "notes.gguf"])
    assert (versions[-1] / "m.gguf").read_bytes() == b"3333333333333333"
    assert done["left_alone"] == [str(models / "notes.gguf")]
    assert "left alone: " + str(models / "notes.gguf") in json.dumps(done["warnings"])  # shown by Ansible
    assert not run_module(VERSIONS, args, tmp_path)["changed"]


def test_pruning_refuses_a_serving_directory_outside_the_models(tmp_path: Path) -> None:
    models, versions = versions_dir(tmp_path)
    refused = run_module(VERSIONS, {"state": "pruned", "directory": str(models), "serving": str(tmp_path),
                                    "keep": 0}, tmp_path)
    assert refused.get("failed") and "not a version directory" in refused["msg"]
    assert all(v.exists() for v in versions) and (models / "m.gguf").exists()


S3_KEY_ID = "AKIALLAMAHOSTTEST000"


def host_credentials(mirror: ModelMirror, tmp_path: Path) -> dict[str, str]:
    """The environment of a host whose AWS credentials are a key pair, with S3's endpoint at ``mirror``."""
    keep = {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}
    return {**keep, "AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": "llamahost-test-secret",
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{mirror.server_address[1]}",
            "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true"}


def test_an_s3_model_is_fetched_with_the_hosts_credentials_each_request_signed_for_its_method(
        mirror: ModelMirror, tmp_path: Path) -> None:
    target = tmp_path / "models"
    target.mkdir()
    files = split_model(mirror, target)
    for entry in files:  # the same bytes as objects of bucket acme-models, under the granted prefix
        name = Path(entry["path"]).name
        mirror.files[f"acme-models/llama/{name}"] = mirror.files.pop(name)
        entry["url"] = f"s3://acme-models/llama/{name}"
    env = host_credentials(mirror, tmp_path)
    args = {"files": files, "s3_region": "eu-west-3"}

    checked = run_module(FETCH, {**args, "state": "checked"}, tmp_path, env=env)
    assert not checked.get("failed") and checked["needed_bytes"] == 4 * MIB and checked["unchecked"] == [], checked
    mirror.drop_after["acme-models/llama/m-00001-of-00002.gguf"] = MIB + 7
    stopped = run_module(FETCH, args, tmp_path, env=env)
    assert stopped.get("failed") and "run the play again to resume" in stopped["msg"], stopped
    assert "X-Amz-Signature" not in stopped["msg"]  # messages name the s3:// URL, never a signed one
    done = run_module(FETCH, args, tmp_path, env=env)
    assert not done.get("failed") and done["resumed"][files[0]["path"]] == MIB + 7, done
    assert [sha(Path(entry["path"]).read_bytes()) for entry in files] == [entry["sha256"] for entry in files]

    # Every request was presigned: the room checks' HEADs, and three GETs (the drop, the resume, shard 2).
    assert len(mirror.queries) == mirror.gets + sum(method == "HEAD" for method, _ in mirror.queries)
    assert mirror.gets == 3 and mirror.ranges == [f"bytes={MIB + 7}-"]
    for _, query in mirror.queries:
        assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
        assert query["X-Amz-Credential"].startswith(f"{S3_KEY_ID}/") and "/eu-west-3/s3/" in query["X-Amz-Credential"]
    signatures = {method: query["X-Amz-Signature"] for method, query in mirror.queries}
    assert signatures["HEAD"] != signatures["GET"]  # each signed for its own method


def test_an_s3_model_without_credentials_or_region_is_named_and_nothing_is_written(
        mirror: ModelMirror, tmp_path: Path) -> None:
    target = tmp_path / "models"
    files = [{"path": str(target / "m.gguf"), "url": "s3://acme-models/llama/m.gguf", "sha256": "ab" * 32}]
    env = host_credentials(mirror, tmp_path)
    no_region = run_module(FETCH, {"files": files}, tmp_path, env=env)
    assert no_region.get("failed") and "llama_server_model_s3_region" in no_region["msg"], no_region
    anonymous = {k: v for k, v in env.items() if not k.startswith("AWS_ACCESS_KEY_ID")}
    refused = run_module(FETCH, {"files": files, "s3_region": "eu-west-3"}, tmp_path, env=anonymous)
    assert refused.get("failed") and "no AWS credentials on the host" in refused["msg"], refused
    assert not target.exists() and mirror.queries == []


@pytest.mark.parametrize(
    ("url", "prefix", "region", "problem"),
    [
        ("s3://acme-models/other/m.gguf", "s3://acme-models/llama/", "eu-west-3", "lies outside s3://acme-models/llama/"),
        ("s3://acme-models/llama-old/m.gguf", "s3://acme-models/llama", "eu-west-3", "lies outside"),
        ("s3://acme-models/llama/m.gguf", "s3://acme-models/llama/", "", "llama_server_model_s3_region"),
        ("s3://acme-models", "", "eu-west-3", "must be an https://, http:// or s3://"),
        ("ftp://mirror/m.gguf", "", "", "must be an https://, http:// or s3://"),
    ],
)
def test_an_s3_url_the_host_may_not_read_is_named(url: str, prefix: str, region: str, problem: str) -> None:
    problems = SHARDS.model_url_problems(url, prefix, region)
    assert any(problem in p for p in problems), problems


def test_a_granted_s3_url_or_an_https_url_has_no_problems() -> None:
    assert SHARDS.model_url_problems("s3://acme-models/llama/m-00001-of-00002.gguf", "s3://acme-models/llama/",
                                     "eu-west-3") == []
    assert SHARDS.model_url_problems("https://mirror.example/m.gguf?x=1", "s3://acme-models/llama/", "") == []
    assert SHARDS.model_url_problems("", "", "") == []


def test_check_mode_reports_the_download_and_writes_nothing(mirror: ModelMirror, tmp_path: Path) -> None:
    files = split_model(mirror, tmp_path)
    dry = run_module(FETCH, {"files": files}, tmp_path, check_mode=True)
    assert dry["changed"] and dry["downloaded"] == [f["path"] for f in files]
    assert mirror.gets == 0 and not any(Path(f["path"]).exists() for f in files)


# ---- the role's tasks, end to end on localhost -------------------------------------------------------------

def model_play(tmp_path: Path, model_vars: dict[str, Any]) -> dict[str, Any]:
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    return {"name": "model", "hosts": "localhost", "gather_facts": False, "connection": "local",
            "vars_files": [str(ROLE / "vars" / "main.yml")],
            "vars": {**defaults, "llama_server_user": "root", "llama_server_model_dir": str(tmp_path / "models"),
                     "llama_server_llamahost_command": str(BIN / "llamahost"),
                     "ansible_python_interpreter": sys.executable, **model_vars},
            "tasks": [{"ansible.builtin.import_tasks": str(ROLE / "tasks" / "validate_model.yml")},
                      {"ansible.builtin.file": {"path": str(tmp_path / "models"), "state": "directory"}},
                      {"ansible.builtin.import_tasks": str(ROLE / "tasks" / "model.yml")}]}


@pytest.mark.skipif(os.geteuid() != 0, reason="the role gives the model files to root, which needs root")
def test_the_role_places_a_split_model_from_the_controller_or_a_url(
        mirror: ModelMirror, tmp_path: Path, tiny_split_model_path: Path) -> None:
    shards = inspect_model(tiny_split_model_path).files
    digests = [cached_sha256(shard) for shard in shards]
    for shard in shards:
        mirror.files[shard.name] = shard.read_bytes()
    copied, fetched, refused = tmp_path / "copied", tmp_path / "fetched", tmp_path / "refused"
    for directory in (copied, fetched, refused):
        directory.mkdir()
    rc, _, output = run_playbook([
        model_play(copied, {"llama_server_model_src": str(tiny_split_model_path),
                            "llama_server_model_sha256": digests}),
        model_play(fetched, {"llama_server_model_url": mirror.url(shards[0].name),
                             "llama_server_model_sha256": digests})])
    assert rc == 0, output
    version = SHARDS.model_version(digests)
    for directory in (copied, fetched):
        assert [p.name for p in (directory / "models").iterdir()] == [version]
        placed = sorted((directory / "models" / version).iterdir())
        assert [p.name for p in placed] == [s.name for s in shards]
        assert [cached_sha256(p) for p in placed] == digests
    rc, report, output = run_playbook([model_play(refused, {"llama_server_model_src": str(tiny_split_model_path),
                                                            "llama_server_model_sha256": digests[:1]})])
    failed = [task["hosts"]["localhost"] for task in report["plays"][0]["tasks"]
              if task["hosts"]["localhost"].get("failed")]
    assert rc != 0 and "must list 2 sha256 digests" in failed[0]["msg"], output
    assert not (refused / "models").exists()  # refused in validation, before anything was made

    outside = {"llama_server_model_url": "s3://acme-models/other/m-00001-of-00002.gguf",
               "llama_server_model_sha256": digests, "llama_server_model_s3_prefix": "s3://acme-models/llama/",
               "llama_server_model_s3_region": "eu-west-3"}
    rc, report, output = run_playbook([model_play(refused, outside)])
    failed = [task["hosts"]["localhost"] for task in report["plays"][0]["tasks"]
              if task["hosts"]["localhost"].get("failed")]
    assert rc != 0 and "lies outside s3://acme-models/llama/" in failed[0]["msg"], output
    assert not (refused / "models").exists() and mirror.queries == []



@pytest.mark.skipif(os.geteuid() != 0, reason="the role gives the model files to root, which needs root")
def test_the_role_links_a_model_of_the_flat_layout_into_its_version_instead_of_fetching_it(
        mirror: ModelMirror, tmp_path: Path, tiny_split_model_path: Path) -> None:
    """A host prepared by an earlier release keeps its model flat in the model directory: the upgrade links it
    into the version directory (one copy on disk, under both names) and downloads nothing."""
    shards = inspect_model(tiny_split_model_path).files
    digests = [cached_sha256(shard) for shard in shards]
    models = tmp_path / "models"
    models.mkdir()
    for shard in shards:
        mirror.files[shard.name] = shard.read_bytes()
        shutil.copyfile(shard, models / shard.name)
    rc, _, output = run_playbook([model_play(tmp_path, {"llama_server_model_url": mirror.url(shards[0].name),
                                                        "llama_server_model_sha256": digests})])
    assert rc == 0, output
    assert mirror.gets == 0
    version = models / SHARDS.model_version(digests)
    for shard in shards:
        assert (version / shard.name).samefile(models / shard.name)
