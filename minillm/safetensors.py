"""The safetensors format, read and written by hand: weights on disk without pickle.

Layout of a file (https://github.com/huggingface/safetensors, "Format"):

    8 bytes        N, the header length, unsigned little-endian
    N bytes        a JSON object, UTF-8, padded with spaces:
                     {"<name>": {"dtype": "F32", "shape": [768, 2304], "data_offsets": [begin, end]},
                      ..., "__metadata__": {"format": "pt"}}
    the rest       the tensors' raw little-endian bytes; each tensor's offsets are relative to here

Why our own: the format is small enough to read in full, and reading it ourselves means weights never
go through pickle (a pickle can run code when loaded). The reader trusts nothing in the file: it
rejects a header longer than the file, offsets that overlap, leave gaps or run past the end, a byte
count that does not match shape x dtype, and dtypes it does not know, each with a `SafetensorsError`
that names the file and the tensor. Files we write load in the `safetensors` library and in
Hugging Face `transformers` (both checked by the tests).
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from pathlib import Path

import torch

# safetensors dtype code <-> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit too


class SafetensorsError(ValueError):
    """A file that is not valid safetensors; the message names the file and what is wrong."""


def _check_byteorder() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("minillm.safetensors supports little-endian machines only")


def _itemsize(tensor: object) -> int:
    return tensor.element_size() if isinstance(tensor, torch.Tensor) else 1


def save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to `path` (atomically: a temporary file renamed into place).

    `metadata` is a flat str -> str map stored as the header's `__metadata__`; Hugging Face
    loaders want `{"format": "pt"}` there.
    """
    _check_byteorder()
    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offset = 0
    blobs = []
    # widest dtypes first: with an 8-byte-aligned data start, every tensor is then aligned to its itemsize
    for name in sorted(tensors, key=lambda n: (-_itemsize(tensors[n]), n)):
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in CODES:
            raise TypeError(f"{name}: dtype {tensor.dtype} has no safetensors code")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        header[name] = {"dtype": CODES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + data.numel()]}
        offset += data.numel()
        blobs.append(data)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for data in blobs:
            f.write(data.numpy().data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str], int]:
    """Validate a file's header: (tensor entries by name, metadata, byte offset where data starts)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: {size} bytes is too short for a safetensors file (8-byte header length missing)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path}: header length {header_len} is larger than the file ({size} bytes)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SafetensorsError(f"{path}: header is not valid UTF-8 JSON ({err})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
    data_len = size - 8 - header_len
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"{path}: tensor {name!r} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise SafetensorsError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise SafetensorsError(f"{path}: tensor {name!r} has bad data_offsets {offsets!r}")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != expected:
            raise SafetensorsError(
                f"{path}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes but shape {shape} of {dtype} "
                f"needs {expected}"
            )
        spans.append((offsets[0], offsets[1], name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin < position:
            raise SafetensorsError(f"{path}: tensor {name!r} overlaps the tensor before it (starts at byte {begin}, previous ends at {position})")
        if begin > position:
            raise SafetensorsError(f"{path}: gap of {begin - position} bytes before tensor {name!r}")
        position = end
    if position != data_len:
        what = "past the end of" if position > data_len else "short of the end of"
        raise SafetensorsError(f"{path}: tensors end at byte {position}, {what} the data ({data_len} bytes)")
    return header, metadata, 8 + header_len


def load_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read every tensor of a validated file; see `load_file_with_metadata` for the metadata too."""
    return load_file_with_metadata(path, device)[0]


def load_file_with_metadata(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors by name, metadata) from `path`; raises SafetensorsError for a damaged file."""
    _check_byteorder()
    header, metadata, data_start = read_header(path)
    with open(path, "rb") as f:
        f.seek(data_start)
        buffer = bytearray(f.read())  # writable, so torch.frombuffer shares it without a warning
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = DTYPES[entry["dtype"]]
        if end == begin:
            tensor = torch.empty(entry["shape"], dtype=dtype)
        else:
            tensor = torch.frombuffer(buffer, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin)
        tensors[name] = tensor.reshape(entry["shape"]).to(device)
    return tensors, metadata
