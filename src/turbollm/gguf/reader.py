"""Open a GGUF file: metadata as plain Python values, tensors as quantized views over an mmap.

Parsing is the `gguf` package's (the format's own reader); this module adds what an engine
needs on top of it: validation with one-line errors that name the file, the key or the tensor
and what is wrong (bad magic, truncated header, unknown quantization type, tensor data past the
end of the file), metadata converted once to Python values, and tensor bytes exposed as torch
uint8 tensors that share the file's pages (no copy into RAM beyond the mmap).

What it leaves out: dequantization (`quants.py`) and the meaning of keys (`turbollm.config`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from turbollm.errors import GGUFError

GGUF_MAGIC = b"GGUF"
_ARRAY_HEADER_BYTES = 12  # uint32 element type + uint64 element count


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are and what they mean."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # logical, outermost first (torch order): a weight is (n_out, n_in)
    offset: int  # absolute byte offset in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def byte_shape(self) -> tuple[int, ...]:
        """Shape of the raw bytes: the logical shape with the row length in bytes, not elements."""
        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        return (*self.shape[:-1], self.shape[-1] // block_size * type_size)


class _Reader(GGUFReader):
    """`GGUFReader` that reads each metadata array as one block.

    The stock reader makes one numpy view per array element, which takes about 12 s for a
    262,144-entry vocabulary (three such arrays). Here a numeric array becomes one typed view
    and a string array one byte view of its (length, bytes) records, decoded by
    `_decode_string_array`. Everything else (header, scalars, tensor infos) is the stock code.
    """

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        if len(raw_itype) != 1 or len(alen) != 1:
            raise ValueError(f"array header at byte {orig_offs} runs past the end of the file")
        itype, n_items = GGUFValueType(int(raw_itype[0])), int(alen[0])
        start = orig_offs + _ARRAY_HEADER_BYTES
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:
            values = self._get(start, nptype, n_items)
            if len(values) != n_items:
                raise ValueError(f"array of {n_items} {itype.name} at byte {start} runs past the end of the file")
            return _ARRAY_HEADER_BYTES + values.nbytes, [raw_itype, alen, values], [2], [GGUFValueType.ARRAY, itype]
        if itype == GGUFValueType.STRING:
            end = _string_array_end(self.data, start, n_items)
            payload = self.data[start:end]
            return end - orig_offs, [raw_itype, alen, payload], [2], [GGUFValueType.ARRAY, itype]
        return super()._get_field_parts(orig_offs, raw_type)  # arrays of arrays: rare, keep stock path

    def _build_tensors(self, start_offs: int, fields) -> None:
        # Check what the stock code would trip over deep inside numpy, and name the tensor.
        known_types = {int(t) for t in GGMLQuantizationType}
        for field in fields:
            name = bytes(field.parts[1]).decode("utf-8", errors="replace")
            raw_type = int(field.parts[4][0])
            if raw_type not in known_types:
                raise GGUFError(f"tensor '{name}' has unknown quantization type {raw_type}")
            dims = [int(d) for d in field.parts[3]]
            block_size, _ = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
            if not dims or any(d <= 0 for d in dims) or dims[0] % block_size:
                qname = GGMLQuantizationType(raw_type).name
                raise GGUFError(f"tensor '{name}' has invalid shape {dims} for type {qname} (row length must be a multiple of {block_size})")
            offset = int(field.parts[5][0])
            if offset % self.alignment:
                raise GGUFError(f"tensor '{name}' data offset {offset} is not aligned to {self.alignment} bytes")
            qtype = GGMLQuantizationType(raw_type)
            n_bytes = int(np.prod(dims, dtype=np.int64)) // block_size * GGML_QUANT_SIZES[qtype][1]
            start, size = start_offs + offset, len(self.data)
            if start + n_bytes > size:
                raise GGUFError(
                    f"tensor '{name}' ({qtype.name}, {n_bytes} bytes at offset {start}) runs past the end of "
                    f"the file ({size} bytes): the file is truncated or corrupt"
                )
        super()._build_tensors(start_offs, fields)


def _string_array_end(data: np.ndarray, start: int, n_items: int) -> int:
    """Byte offset just past an array of `n_items` GGUF strings (uint64 length + bytes each)."""
    buf = memoryview(data)
    size, pos = len(buf), start
    for _ in range(n_items):
        if pos + 8 > size:
            raise ValueError(f"string array at byte {start} runs past the end of the file")
        pos += 8 + int.from_bytes(buf[pos : pos + 8], "little")
    if pos > size:
        raise ValueError(f"string array at byte {start} runs past the end of the file")
    return pos


def _decode_string_array(payload: np.ndarray, n_items: int) -> list[str]:
    buf, pos, out = payload.tobytes(), 0, []
    for _ in range(n_items):
        length = int.from_bytes(buf[pos : pos + 8], "little")
        out.append(buf[pos + 8 : pos + 8 + length].decode("utf-8", errors="replace"))
        pos += 8 + length
    return out


def _field_value(field) -> Any:
    """A metadata field as a Python value: scalar, str, or list (numeric arrays as lists too)."""
    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        sub = field.types[-1] if len(field.types) > 1 else None
        n_items = int(field.parts[field.data[0] - 1][0]) if len(field.data) == 1 else len(field.data)
        if sub == GGUFValueType.STRING and len(field.data) == 1:
            return _decode_string_array(field.parts[field.data[0]], n_items)
        if len(field.data) == 1 and sub != GGUFValueType.STRING:
            return field.parts[field.data[0]].tolist()
        return field.contents()
    if main == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", errors="replace")
    return field.parts[-1].tolist()[0]


def _readonly_view(array: np.ndarray) -> torch.Tensor:
    # The mmap is read-only; torch warns that writes would be undefined. Nothing here writes.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


class GGUFFile:
    """A validated GGUF file: `metadata` (key -> value), `tensors` (name -> TensorInfo), mmap-backed."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        where = str(self.path)
        if not self.path.is_file():
            raise GGUFError(f"{where}: no such file")
        self.file_size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{where}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
        try:
            reader = _Reader(self.path, "r")
        except GGUFError as e:
            raise GGUFError(f"{where}: {e}") from None
        except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, TypeError) as e:
            raise GGUFError(f"{where}: corrupt or truncated GGUF header ({self.file_size} bytes): {e}") from None
        if reader.byte_order != "I":
            raise GGUFError(f"{where}: big-endian GGUF files are not supported")
        self._data = reader.data  # np.memmap over the whole file
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = _field_value(field)
            except (ValueError, IndexError) as e:
                raise GGUFError(f"{where}: metadata key '{key}' is corrupt: {e}") from None
        self.tensors: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            info = TensorInfo(
                name=t.name,
                qtype=GGMLQuantizationType(t.tensor_type),
                shape=tuple(int(d) for d in reversed(t.shape.tolist())),
                offset=int(t.data_offset),
                n_bytes=int(t.n_bytes),
            )
            self.tensors[info.name] = info

    def load_resident(self, mode: str, progress=None) -> None:
        """Make the weights resident before the first token (llama.cpp --no-mmap / --mlock):
        "copy" reads the file into this process's own memory (no page cache eviction can
        take it away; costs the file's size in RAM), "lock" pins the mapped pages (mlock; needs
        RLIMIT_MEMLOCK, `ulimit -l`, of at least the file's size). `progress(done, total)` is
        called as the bytes come in. Tensors fetched afterwards view the resident bytes."""
        total, step = self.file_size, 64 * 2**20
        if mode == "copy":
            data = np.empty(total, dtype=np.uint8)
            with open(self.path, "rb") as f:
                for at in range(0, total, step):
                    n = f.readinto(memoryview(data[at:at + step]))
                    if n != min(step, total - at):
                        raise GGUFError(f"{self.path}: short read at byte {at}: the file changed while loading")
                    if progress:
                        progress(at + n, total)
            self._data = data
        elif mode == "lock":
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            address = self._data.ctypes.data
            for at in range(0, total, step):
                n = min(step, total - at)
                if libc.mlock(ctypes.c_void_p(address + at), ctypes.c_size_t(n)) != 0:
                    err = ctypes.get_errno()
                    raise GGUFError(f"{self.path}: --mlock failed after {at / 2**20:,.0f} of {total / 2**20:,.0f} MiB "
                                    f"({os.strerror(err)}): raise the locked-memory limit (ulimit -l) or drop --mlock")
                if progress:
                    progress(at + n, total)
        else:
            raise ValueError(f"unknown residency mode {mode!r}")

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: missing required metadata key '{key}'")
        return self.metadata[key]

    def tensor_bytes(self, name: str) -> torch.Tensor:
        """The raw bytes of tensor `name` as a uint8 tensor of `TensorInfo.byte_shape`, sharing the mmap."""
        info = self.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self.path}: missing tensor '{name}'")
        raw = self._data[info.offset : info.offset + info.n_bytes]
        return _readonly_view(raw).view(info.byte_shape)

    @property
    def tensor_data_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors.values())
