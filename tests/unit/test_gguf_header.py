"""The bounded GGUF header reader: it reads what the reference reader reads, and a hostile file costs neither
memory nor time.

Hostile files are built byte by byte here (the reference writer cannot write a lie), each under a few hundred
bytes, and handed to ``llamahost model check`` in a child with a 1 GiB address-space limit and a time limit:
refused with exit 2, a message naming the problem, no traceback.
"""

from __future__ import annotations

import os
import re
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import gguf
import pytest

from tuner.errors import UserError
from tuner.model.gguf_file import inspect_model
from tuner.model.gguf_header import read_header

U32, U64, STRING, ARRAY, F32_TYPE = 4, 10, 8, 9, 0
ADDRESS_SPACE_LIMIT = 1 << 30
TIME_LIMIT_S = 30


def text(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, value_type: int, payload: bytes) -> bytes:
    return text(key) + struct.pack("<I", value_type) + payload


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, U32, struct.pack("<I", value))


def kv_string(key: str, value: str) -> bytes:
    return kv(key, STRING, text(value))


def kv_array(key: str, element_type: int, count: int, elements: bytes = b"") -> bytes:
    return kv(key, ARRAY, struct.pack("<IQ", element_type, count) + elements)


def tensor_entry(name: str | bytes, shape: tuple[int, ...], type_id: int = F32_TYPE, offset: int = 0) -> bytes:
    return (text(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
            + struct.pack("<IQ", type_id, offset))


def gguf_file(path: Path, kvs: list[bytes], tensors: Sequence[bytes] = (), *, data: bytes = b"",
              n_kv: int | None = None, n_tensors: int | None = None) -> Path:
    """A GGUF v3 file from raw entries; the counts may lie."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    body += b"\0" * (-len(body) % 32)
    path.write_bytes(body + data)
    return path


LLAMA = [kv_string("general.architecture", "llama"), kv_u32("llama.block_count", 1),
         kv_u32("llama.embedding_length", 4)]
ONE_TENSOR = [tensor_entry("token_embd.weight", (4, 2))]
ONE_TENSOR_DATA = b"\0" * 32


def test_a_hand_built_model_is_valid(tmp_path: Path) -> None:
    """The builder itself makes a file the intake accepts, so each hostile variant below differs by its lie."""
    info = inspect_model(gguf_file(tmp_path / "ok.gguf", LLAMA, ONE_TENSOR, data=ONE_TENSOR_DATA))
    assert (info.architecture, info.n_layers, info.n_embd, info.n_params, info.tensor_bytes) == ("llama", 1, 4, 8, 32)


def test_the_real_model_reads_as_the_reference_reader_reads_it(model_path: Path) -> None:
    """Every metadata field (value, type, order) and every tensor (shape, type, size, data offset) agree."""
    header = read_header(model_path, keep_array=lambda key, count: True)
    reference = gguf.GGUFReader(model_path)
    assert [f.key for f in header.fields] == [k for k in reference.fields if not k.startswith("GGUF.")]
    for field in header.fields:
        expected = reference.fields[field.key]
        assert field.value_type == expected.types[0], field.key
        value = field.value
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [item.decode() for item in value]
        assert value == expected.contents(), field.key
    ours = [(t.name, t.shape, t.type_name, t.n_elements, t.n_bytes, t.start) for t in header.tensors]
    theirs = [(t.name, tuple(int(d) for d in t.shape), t.tensor_type.name, int(t.n_elements), int(t.n_bytes),
               int(t.data_offset)) for t in reference.tensors]
    assert ours == theirs


def test_arrays_are_counted_not_kept_unless_asked(model_path: Path) -> None:
    header = read_header(model_path)
    tokens = header.field("tokenizer.ggml.tokens")
    assert tokens is not None and tokens.value is None and tokens.count == 49152
    assert inspect_model(model_path).n_vocab == 49152


NESTED_5_DEEP = struct.pack("<IQ", ARRAY, 1) * 4 + struct.pack("<IQ", U32, 0)

HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "numeric array of 2^40 elements": (
        lambda p: gguf_file(p, [*LLAMA, kv_array("llama.rope.dims", U32, 1 << 40)], ONE_TENSOR, data=ONE_TENSOR_DATA),
        "claims 1099511627776 elements"),
    "string array of 2^40 elements": (
        lambda p: gguf_file(p, [kv_array("tokenizer.ggml.tokens", STRING, 1 << 40)]),
        "claims 1099511627776 elements"),
    "string array longer than the file": (
        lambda p: gguf_file(p, [kv_array("tokenizer.ggml.tokens", STRING, 1 << 20)]),
        "claims 8388608 bytes, but only"),
    "a key of 2^62 bytes": (
        lambda p: gguf_file(p, [struct.pack("<Q", 1 << 62) + bytes(16)]),
        "a metadata key at byte 24 is 4611686018427387904 bytes long"),
    "a string value of 2^62 bytes": (
        lambda p: gguf_file(p, [kv("general.architecture", STRING, struct.pack("<Q", 1 << 62))]),
        "claims 4611686018427387904 bytes, but only"),
    "arrays nested 5 deep": (
        lambda p: gguf_file(p, [kv_array("x", ARRAY, 1, NESTED_5_DEEP)]),
        "nests arrays more than 4 deep"),
    "a split.count of 2^40": (
        lambda p: gguf_file(p, [*LLAMA, kv("split.count", U64, struct.pack("<Q", 1 << 40))], ONE_TENSOR,
                            data=ONE_TENSOR_DATA),
        "split.count is 1099511627776 (1 to 65535)"),
    "more keys claimed than bytes": (
        lambda p: gguf_file(p, LLAMA, n_kv=50_000),
        "more than the"),
    "zero parameters, no hyper-parameters": (
        lambda p: gguf_file(p, [kv_string("general.architecture", "llama")], [tensor_entry("a", (0,))]),
        "hold no parameters"),
    "no layers": (
        lambda p: gguf_file(p, [kv_string("general.architecture", "llama")], ONE_TENSOR, data=ONE_TENSOR_DATA),
        "has no layers"),
    "a tensor of 5 dimensions": (
        lambda p: gguf_file(p, LLAMA, [tensor_entry("t", (1, 1, 1, 1, 1))], data=ONE_TENSOR_DATA),
        "has 5 dimensions"),
    "a tensor of unknown type": (
        lambda p: gguf_file(p, LLAMA, [tensor_entry("t", (4,), type_id=999)], data=ONE_TENSOR_DATA),
        "unknown type 999"),
    "a tensor of 2^64 - 1 elements": (
        lambda p: gguf_file(p, LLAMA, [tensor_entry("t", ((1 << 32) - 1, (1 << 32) + 1))], data=ONE_TENSOR_DATA),
        "claims 18446744073709551615 elements"),
    "a tensor past the end": (
        lambda p: gguf_file(p, LLAMA, [tensor_entry("t", (1 << 40,))], data=ONE_TENSOR_DATA),
        "past the end of the file"),
    "a misaligned tensor": (
        lambda p: gguf_file(p, LLAMA, [tensor_entry("t", (2,), offset=4)], data=ONE_TENSOR_DATA),
        "not a multiple of the alignment 32"),
    "a tensor name of 100 bytes": (
        lambda p: gguf_file(p, LLAMA, [tensor_entry("n" * 100, (4,))], data=ONE_TENSOR_DATA),
        "is 100 bytes long (limit 63)"),
    "a tensor twice": (
        lambda p: gguf_file(p, LLAMA, [tensor_entry("t", (4,)), tensor_entry("t", (4,))], data=ONE_TENSOR_DATA),
        "appears twice"),
    "an alignment of 3": (
        lambda p: gguf_file(p, [*LLAMA, kv_u32("general.alignment", 3)], ONE_TENSOR, data=ONE_TENSOR_DATA),
        "general.alignment is 3, not a power of two"),
}


def limited_child() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def model_check(path: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "tuner.cli", "model", "check", str(path)], capture_output=True,
                          text=True, timeout=TIME_LIMIT_S, preexec_fn=limited_child, check=False)
    return done, time.monotonic() - started


def test_the_model_check_runs_within_the_limits_on_a_real_model(model_path: Path) -> None:
    """The limits the hostile files are checked under are ones a real check lives within."""
    done, _ = model_check(model_path)
    assert done.returncode == 0, done.stderr
    assert "is a valid GGUF v3 model" in done.stdout


# The lies that made the reference reader allocate without bound: also run through the command line in a
# limited child (each child costs seconds of start-up, so the others are checked in this process).
MEMORY_BOMBS = ("numeric array of 2^40 elements", "string array of 2^40 elements", "a split.count of 2^40",
                "a key of 2^62 bytes", "a string value of 2^62 bytes")


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_file_is_refused_with_the_problem_named(case: str, tmp_path: Path) -> None:
    build, message = HOSTILE[case]
    path = build(tmp_path / "hostile.gguf")
    assert path.stat().st_size < 400
    with pytest.raises(UserError, match=re.escape(message)):
        inspect_model(path)


@pytest.mark.parametrize("case", MEMORY_BOMBS)
def test_a_memory_bomb_is_refused_in_bounded_memory_and_time(case: str, tmp_path: Path) -> None:
    build, message = HOSTILE[case]
    path = build(tmp_path / "hostile.gguf")
    done, took = model_check(path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr and str(path) in done.stderr
    assert "Traceback" not in done.stderr and "MemoryError" not in done.stderr
    print(f"{case}: refused in {took:.2f} s")


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    done, took = model_check(fifo)  # a blocking open or read would hit the subprocess timeout
    assert done.returncode == 2 and "is not a regular file" in done.stderr, done.stderr
    assert took < TIME_LIMIT_S


def test_a_device_is_refused(tmp_path: Path) -> None:
    device = tmp_path / "zero.gguf"
    device.symlink_to("/dev/zero")
    with pytest.raises(UserError, match="is not a regular file"):
        inspect_model(device)


def write_split(directory: Path, count: int, *, named: int | None = None, numbers: list[int] | None = None
                ) -> list[Path]:
    """``count`` shards as gguf-split writes them (split.no, split.count), optionally misnamed or misnumbered."""
    paths = []
    for index in range(count):
        no = index if numbers is None else numbers[index]
        split = [kv("split.no", 2, struct.pack("<H", no)), kv("split.count", 2, struct.pack("<H", count))]
        kvs = [*LLAMA, *split] if index == 0 else split
        name = f"m-{index + 1:05d}-of-{named or count:05d}.gguf"
        tensors = [tensor_entry(f"t{index}", (4, 2))]
        paths.append(gguf_file(directory / name, kvs, tensors, data=ONE_TENSOR_DATA))
    return paths


def test_a_split_model_is_read_across_its_shards(tmp_path: Path) -> None:
    first = write_split(tmp_path, 3)[0]
    info = inspect_model(first)
    assert [p.name for p in info.files] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert info.n_params == 3 * 8


@pytest.mark.parametrize(("shards", "open_index", "message"), [
    (dict(count=2, named=3), 0, "the name says 3 shards but the file's split.count says 2"),
    (dict(count=2), 1, "is shard 2 of 2, not the first"),
    (dict(count=3, numbers=[0, 2, 1]), 0, "shard 2 of 3 says it is shard 3 of 3"),
])
def test_shards_that_disagree_are_refused(tmp_path: Path, shards: dict[str, object], open_index: int,
                                          message: str) -> None:
    paths = write_split(tmp_path, **shards)  # type: ignore[arg-type]
    with pytest.raises(UserError, match=message):
        inspect_model(paths[open_index])


def test_a_vocabulary_cut_short_is_refused_by_the_walk(tmp_path: Path) -> None:
    """More strings claimed than the file holds, though their 8-byte lengths alone would fit: the walk over
    the strings (not kept) finds the end of the file."""
    tokens = b"".join(text(f"t{i}") for i in range(1000))
    path = gguf_file(tmp_path / "cut.gguf", [*LLAMA, kv_array("tokenizer.ggml.tokens", STRING, 1400, tokens)])
    started = time.monotonic()
    with pytest.raises(UserError, match="runs past the end of the file"):
        inspect_model(path)
    assert time.monotonic() - started < TIME_LIMIT_S
    assert path.stat().st_size < 20_000
