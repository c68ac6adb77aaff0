"""Our safetensors reader and writer: round trips, agreement with the reference library, broken files."""

import json
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minillm.safetensors import DTYPES, SafetensorsError, load_file, load_file_with_metadata, read_header, save_file


def random_tensor(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=torch.int64).to(dtype)


@given(
    specs=st.lists(
        st.tuples(st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 4), max_size=3)),
        min_size=0, max_size=6,
    )
)
def test_round_trip_any_dtypes_and_shapes(specs, tmp_path_factory):
    tensors = {f"t{i}.{code}": random_tensor(DTYPES[code], shape, seed=i) for i, (code, shape) in enumerate(specs)}
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "hi"})
    loaded, metadata = load_file_with_metadata(path)
    assert metadata == {"format": "pt", "note": "hi"}
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name], tensor), name
    _, _, data_start = read_header(path)
    assert data_start % 8 == 0


def test_agrees_with_the_reference_library(tmp_path):
    reference = pytest.importorskip("safetensors.torch", reason="the safetensors package is not installed")
    tensors = {"a": random_tensor(torch.float32, (3, 5)), "b": random_tensor(torch.bfloat16, (7,)),
               "c": random_tensor(torch.int64, (2, 2)), "d": random_tensor(torch.float16, ())}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_file(tensors, ours, metadata={"format": "pt"})
    reference.save_file(tensors, str(theirs), metadata={"format": "pt"})
    for a, b in ((reference.load_file(str(ours)), tensors), (load_file(theirs), tensors)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def write_raw(path, header: dict, data: bytes, header_len: int | None = None):
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if header_len is None else header_len) + encoded + data)
    return path


@pytest.mark.parametrize(
    "header,data,header_len,match",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10_000, "header length 10000 is larger than the file"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
         b"\0" * 12, None, "'b' overlaps the tensor before it"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}},
         b"\0" * 12, None, "gap of 4 bytes before tensor 'b'"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "spans 8 bytes but shape \\[3\\] of F32 needs 12"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2, None, "unknown dtype 'Q4'"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "past the end of the data"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, None, "short of the end of the data"),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "needs exactly dtype, shape and data_offsets"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "bad shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "bad data_offsets"),
        ({"__metadata__": {"format": 1}}, b"", None, "__metadata__ must map strings to strings"),
    ],
)
def test_broken_files_are_rejected_with_a_clear_error(tmp_path, header, data, header_len, match):
    path = write_raw(tmp_path / "broken.safetensors", header, data, header_len)
    with pytest.raises(SafetensorsError, match=match) as err:
        load_file(path)
    assert str(path) in str(err.value)


def test_garbage_and_truncated_files(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsError, match="too short"):
        load_file(short)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]")
    with pytest.raises(SafetensorsError, match="not valid UTF-8 JSON"):
        load_file(garbage)
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(64, 64)}, good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(SafetensorsError, match="past the end of the data"):
        load_file(cut)


def test_writer_rejects_what_it_cannot_store(tmp_path):
    with pytest.raises(TypeError, match="no safetensors code"):
        save_file({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")
    with pytest.raises(TypeError, match="metadata must map strings to strings"):
        save_file({"a": torch.zeros(2)}, tmp_path / "m.safetensors", metadata={"step": 3})
    assert not list(tmp_path.iterdir())  # nothing half-written left behind
