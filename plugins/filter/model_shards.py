"""Jinja filters for the model's files: one GGUF, or a split GGUF as llama.cpp's gguf-split publishes it.

A split model is named by its first shard (``name-00001-of-00003.gguf``, a controller path or a URL); the
other shards have the same name with their own number, as ``tuner.model.gguf_file.split_files`` expects.
``llama_server_model_sha256`` is one sha256 for one file, or a list with one sha256 per shard in shard order.
The server is started on the first shard; llama.cpp finds the others beside it.

Each model lives in its own version directory, ``<llama_server_model_dir>/<version>/``, named by its content
(:func:`model_version`), so a new model never overwrites the one that serves: the role's rollback restores a
unit that still finds its files, and older versions are pruned only once a new one serves. Models placed by
earlier releases of the role lay flat in the directory: each shard's ``earlier_path`` says where such a file
would be, so the role links it into its version directory (the model_versions module) instead of fetching it
again.
"""

from __future__ import annotations

import hashlib
import re


_FIRST_SHARD = re.compile(r"-00001-of-(\d{5})\.gguf$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_URL = re.compile(r"^(https?|s3)://[^/\s]+/\S*$")
_S3_URL = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/\S+$")


def _split_source(source):
    """(path part, suffix): a URL's query or fragment stays on every shard's URL."""
    source = str(source)
    cut = min([i for i in (source.find("?"), source.find("#")) if i >= 0], default=len(source))
    return source[:cut], source[cut:]


def _shard_count(source):
    path, _ = _split_source(source)
    match = _FIRST_SHARD.search(path)
    return int(match.group(1)) if match else 1


def _digests(sha256):
    if isinstance(sha256, str):
        return [sha256]
    if isinstance(sha256, (list, tuple)):
        return [str(d) for d in sha256]
    return [str(sha256)]


def model_shard_problems(source, sha256, name=""):
    """What is wrong with a model source, its sha256 value and the file name on the host (empty when nothing
    is)."""
    count = _shard_count(source)
    digests = _digests(sha256)
    problems = []
    bad = [d for d in digests if not _SHA256.match(d)]
    if bad or not digests:
        problems.append(f"llama_server_model_sha256 must be a 64-hex-digit sha256 (a list of them for a split "
                        f"model), got {bad or digests!r}")
    if count == 1 and len(digests) != 1:
        problems.append(f"llama_server_model_sha256 lists {len(digests)} digests, but {source} is one file "
                        "(a split model is named by its first shard, NAME-00001-of-000NN.gguf)")
    if count > 1 and len(digests) != count:
        problems.append(f"{source} is the first of {count} shards, so llama_server_model_sha256 must list "
                        f"{count} sha256 digests in shard order (sha256sum NAME-000*-of-{count:05d}.gguf), "
                        f"got {len(digests)}")
    if count > 1 and name and not str(name).endswith(f"-00001-of-{count:05d}.gguf"):
        problems.append(f"llama_server_model_name {name} must end in -00001-of-{count:05d}.gguf like the first "
                        "shard: llama.cpp finds the other shards by their numbers")
    return problems


def model_url_problems(url, s3_prefix="", s3_region=""):
    """What is wrong with ``llama_server_model_url`` for this host (empty when nothing is).

    An ``s3://`` URL is read with the host's own AWS role, which may read only its grant
    (``llama_server_model_s3_prefix``, written by the stack's inventory): a URL outside it would fail with
    403 after the other roles changed the host, so it is refused in validation.
    """
    url = str(url or "")
    if not url:
        return []
    if not _URL.match(url):
        return [f"llama_server_model_url {url} must be an https://, http:// or s3://bucket/key URL"]
    if not url.startswith("s3://"):
        return []
    problems = []
    if not _S3_URL.match(url):
        problems.append(f"llama_server_model_url {url} must name an object, s3://BUCKET/KEY.gguf")
    prefix = str(s3_prefix or "")
    if prefix:
        granted = prefix if prefix.endswith("/") else prefix + "/"
        if not url.startswith(granted):
            problems.append(f"llama_server_model_url {url} lies outside {granted}, the only prefix this host's "
                            "AWS role may read (llama_server_model_s3_prefix, the stack's llamahost:modelS3Uri): "
                            "put the model under it, or grant its prefix in the stack")
    if not s3_region:
        problems.append(f"llama_server_model_url {url} is signed for the bucket's region: set "
                        "llama_server_model_s3_region (the stack's inventory sets it)")
    return problems


def model_version(sha256):
    """The name of a model's version directory: a one-file model's own sha256, or the sha256 of a split
    model's digests in shard order (one per line), cut to 16 hex digits either way. Any change to any shard is
    a new version; the same files are always the same version."""
    digests = [d.lower() for d in _digests(sha256)]
    whole = digests[0] if len(digests) == 1 else hashlib.sha256("\n".join(digests).encode()).hexdigest()
    return whole[:16]


def model_shards(source, sha256, directory, name=""):
    """The files to place: ``[{name, source, sha256, path, earlier_path}]`` in shard order, the first one
    served.

    ``path`` lies in the model's version directory (:func:`model_version`); ``earlier_path`` is where the flat
    layout of earlier releases kept the same file. ``name`` renames the file on the host (a split model keeps
    its shard numbers: llama.cpp needs them). The sha256 values are checked by :func:`model_shard_problems` in
    validation (a missing one is "", and the paths then render without failing, for validation to refuse).
    """
    count = _shard_count(source)
    path, suffix = _split_source(source)
    base = name or path.rstrip("/").rsplit("/", 1)[-1]
    digests = [str(d).lower() for d in _digests(sha256)] + [""] * count
    directory = str(directory).rstrip("/")
    version = f"{directory}/{model_version(digests[:count])}"
    shards = []
    for number in range(1, count + 1):
        tag = f"-{number:05d}-of-{count:05d}.gguf"
        this_source = _FIRST_SHARD.sub(tag, path) + suffix if count > 1 else str(source)
        this_name = _FIRST_SHARD.sub(tag, base) if count > 1 else base
        shards.append({"name": this_name, "source": this_source, "sha256": digests[number - 1],
                       "path": f"{version}/{this_name}", "earlier_path": f"{directory}/{this_name}"})
    return shards


def model_fetch_files(shards, sizes=None):
    """The ``files`` of the model_fetch module: each shard's URL, or its size when the controller copies it,
    with the flat path of earlier releases (a file there is linked into place, so it needs no room)."""
    common = [{"path": s["path"], "sha256": s["sha256"], "earlier_path": s["earlier_path"]} for s in shards]
    if sizes:
        return [{**c, "size": int(n)} for c, n in zip(common, sizes)]
    return [{**c, "url": s["source"]} for c, s in zip(common, shards)]


class FilterModule:
    def filters(self):
        return {"model_shards": model_shards, "model_shard_problems": model_shard_problems,
                "model_url_problems": model_url_problems, "model_fetch_files": model_fetch_files}
