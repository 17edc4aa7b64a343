"""Build the lab's base image once and keep it, keyed by its recipe.

``<lab cache>/images/<key>/`` holds a finished image: ``disk.img`` (raw, sparse), ``grub.lnx`` (the
bootloader QEMU loads), the SSH key pair the image trusts, the image's SSH host key, and
``manifest.json`` (recipe, root UUID, step timings). The key pair lives with the image on purpose: the
public half is baked into the disk, so the two are only ever valid together.

A build runs in a hidden staging directory under a lock and is renamed into place when complete, so an
interrupted or concurrent build never leaves half an image that a later run would trust. The lab cache
is ``LLAMAHOST_LAB_CACHE`` when set (CI and the test suite share one image across sessions that use a
throw-away ``LLAMAHOST_HOME``), else ``<llamahost cache>/lab``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuner.atomic import write_atomic
from tuner.errors import UserError
from tuner.lab.recipe import (
    BOOTLOADER_NAME,
    HOST_KEY_NAME,
    customize_hook,
    essential_hook,
    image_key,
    mkfs_command,
    mmdebstrap_command,
)
from tuner.lab.spec import ImageRecipe, root_uuid
from tuner.paths import cache_dir

Progress = Callable[[str], None]
MANIFEST = "manifest.json"
BUILD_LOG = "build.log"
FAILED_LOG = "last-failed-build.log"
# Debian package that provides each tool the build runs (named in the error when one is missing).
BUILD_TOOLS = {"mmdebstrap": "mmdebstrap", "mkfs.ext4": "e2fsprogs", "ssh-keygen": "openssh-client"}
BUILD_TIMEOUT_S = 1800


def lab_cache_dir() -> Path:
    override = os.environ.get("LLAMAHOST_LAB_CACHE")
    return Path(override) if override else cache_dir() / "lab"


@dataclass(frozen=True)
class LabImage:
    """A finished base image and the files that go with it."""

    key: str
    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / "disk.img"

    @property
    def bootloader(self) -> Path:
        return self.directory / BOOTLOADER_NAME

    @property
    def identity(self) -> Path:
        return self.directory / "id_ed25519"

    @property
    def host_public_key(self) -> Path:
        return self.directory / HOST_KEY_NAME

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.manifest_path.read_text())
        return data

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.disk, self.bootloader, self.identity, self.host_public_key,
                                         self.manifest_path))


def images_dir(cache: Path) -> Path:
    return cache / "images"


def find_image(recipe: ImageRecipe, cache: Path) -> LabImage | None:
    key = image_key(recipe)
    image = LabImage(key, images_dir(cache) / key)
    return image if image.complete() else None


def ensure_image(recipe: ImageRecipe, cache: Path, *, progress: Progress | None = None,
                 rebuild: bool = False) -> LabImage:
    """The cached image for ``recipe``, built first when there is none (or when ``rebuild``)."""
    say = progress or (lambda _message: None)
    if not rebuild and (image := find_image(recipe, cache)) is not None:
        return image
    _check_build_prerequisites()
    images = images_dir(cache)
    images.mkdir(parents=True, exist_ok=True)
    with _locked(images / ".lock"):
        if not rebuild and (image := find_image(recipe, cache)) is not None:
            return image  # built by someone else while we waited
        _remove_stale_staging(images)
        return _build(recipe, images, say)


def _check_build_prerequisites() -> None:
    if os.geteuid() != 0:
        raise UserError(
            "building the lab image needs root: mmdebstrap installs packages in a chroot and mkfs.ext4 -d "
            "must keep the files' root ownership",
            "run `sudo llamahost lab up` once (later boots reuse the cached image), or set "
            "LLAMAHOST_LAB_CACHE to a cache that already holds the image")
    missing = sorted(f"{tool} (Debian package {pkg})" for tool, pkg in BUILD_TOOLS.items()
                     if shutil.which(tool) is None)
    if missing:
        raise UserError(f"the lab image build needs {', '.join(missing)}",
                        "run .ci/system-deps.sh (or apt-get install the packages named above)")


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    with lock_file.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_staging(images: Path) -> None:
    """Staging directories left by an interrupted build (we hold the lock, so none is in use)."""
    for leftover in images.glob(".build-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _build(recipe: ImageRecipe, images: Path, say: Progress) -> LabImage:
    key = image_key(recipe)
    uuid = root_uuid(key)
    staging = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=images))
    log = staging / BUILD_LOG
    timings: dict[str, float] = {}
    try:
        identity = staging / "id_ed25519"
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "llamahost-lab", "-f", str(identity)],
             log, "generate the lab's SSH key")
        essential = staging / "essential.sh"
        essential.write_text(essential_hook())
        customize = staging / "customize.sh"
        customize.write_text(customize_hook(recipe))
        root = staging / "root"

        say(f"building the lab image {key}: Debian {recipe.suite} root with mmdebstrap (a few minutes)")
        started = time.monotonic()
        _run(mmdebstrap_command(recipe, root_dir=root, essential_script=essential, customize_script=customize,
                                public_key=identity.with_suffix(".pub"), out_dir=staging, uuid=uuid),
             log, "build the Debian root with mmdebstrap")
        timings["mmdebstrap_s"] = round(time.monotonic() - started, 1)

        say(f"writing the {recipe.disk_gib} GiB disk image with mkfs.ext4 -d")
        started = time.monotonic()
        _run(mkfs_command(recipe, root_dir=root, image=staging / "disk.img", uuid=uuid), log,
             "make the disk image with mkfs.ext4")
        timings["mkfs_s"] = round(time.monotonic() - started, 1)
        shutil.rmtree(root)

        manifest = {
            "key": key,
            "recipe": recipe.fields(),
            "root_uuid": uuid,
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "timings": timings,
        }
        write_atomic(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n", keep_previous=False)
        final = images / key
        if final.exists():
            shutil.rmtree(final)  # an incomplete directory from an older, unlocked build
        staging.rename(final)
        say(f"lab image ready in {sum(timings.values()):.0f} s: {final}")
        return LabImage(key, final)
    except BaseException:
        if log.exists():
            shutil.copyfile(log, images / FAILED_LOG)
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _run(cmd: list[str], log: Path, what: str) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        try:
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise UserError(f"the lab image build could not {what} within {BUILD_TIMEOUT_S} s",
                            f"see the log in {log.parent.parent / FAILED_LOG}") from None
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-6:]
        raise UserError(f"the lab image build could not {what} (exit {done.returncode}):\n    "
                        + "\n    ".join(tail),
                        f"the whole log is kept in {log.parent.parent / FAILED_LOG}; check the apt sources "
                        "and network access to the Debian mirror")
