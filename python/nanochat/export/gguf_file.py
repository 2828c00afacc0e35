"""A minimal, fast GGUF reader: metadata into Python values, tensors as numpy views of one read-only mmap.

``gguf.GGUFReader`` builds a numpy memmap object per metadata part, which costs ~1.2 s for a 16k-token vocabulary;
this reader parses the header with ``struct`` (tens of milliseconds) and maps tensor data without copying. Every
out-of-bounds read — a truncated or corrupt file — raises :class:`GGUFFormatError` with the offset.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# GGUF metadata value types
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_NP_ARRAY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
DEFAULT_ALIGNMENT = 32


class GGUFFormatError(ValueError):
    pass


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne[0] (the fastest-varying, i.e. columns) first
    type: int  # ggml type id
    data: np.ndarray  # raw view: float32/float16/uint16 for float types, uint8 bytes for quantized ones


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as e:  # empty file
                raise GGUFFormatError(f"cannot map the file: {e}") from None
        self._off = 0
        magic = self._read(4)
        if magic != b"GGUF":
            raise GGUFFormatError(f"bad magic {magic!r}")
        self.version = self._scalar("<I")
        if self.version not in (2, 3):
            raise GGUFFormatError(f"unsupported GGUF version {self.version}")
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise GGUFFormatError(f"implausible counts: {n_tensors} tensors, {n_kv} keys")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            nd = self._scalar("<I")
            if nd > 8:
                raise GGUFFormatError(f"tensor {name!r} has {nd} dimensions")
            shape = tuple(self._scalar("<Q") for _ in range(nd))
            infos.append((name, shape, self._scalar("<I"), self._scalar("<Q")))
        align = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = (self._off + align - 1) // align * align
        self.tensors = [self._tensor(n, s, t, data_start + o) for n, s, t, o in infos]

    # -- primitive reads, all bounds-checked
    def _read(self, n: int) -> bytes:
        end = self._off + n
        if end > len(self._mm):
            raise GGUFFormatError(f"truncated: need {n} bytes at offset {self._off}, file has {len(self._mm)}")
        b = self._mm[self._off : end]
        self._off = end
        return b

    def _scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self._off + size > len(self._mm):
            raise GGUFFormatError(f"truncated at offset {self._off}")
        (v,) = struct.unpack_from(fmt, self._mm, self._off)
        self._off += size
        return v

    def _string(self) -> str:
        n = self._scalar("<Q")
        try:
            return self._read(n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"invalid UTF-8 string at offset {self._off - n}: {e}") from None

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = self._scalar("<I"), self._scalar("<Q")
            if etype in _NP_ARRAY:
                dt = np.dtype(_NP_ARRAY[etype]).newbyteorder("<")
                raw = self._read(count * dt.itemsize)
                return np.frombuffer(raw, dtype=dt).tolist()
            if etype == _STRING:
                out = []
                mm, off, size = self._mm, self._off, len(self._mm)
                for _ in range(count):  # the hot loop of a tokenizer: inline the length-prefixed reads
                    if off + 8 > size:
                        raise GGUFFormatError(f"truncated string array at offset {off}")
                    (n,) = struct.unpack_from("<Q", mm, off)
                    off += 8
                    if off + n > size:
                        raise GGUFFormatError(f"truncated string array at offset {off}")
                    out.append(mm[off : off + n].decode("utf-8", errors="replace"))
                    off += n
                self._off = off
                return out
            return [self._value(etype) for _ in range(count)]
        raise GGUFFormatError(f"unknown metadata value type {vtype} at offset {self._off}")

    def _tensor(self, name: str, shape: tuple[int, ...], ttype: int, offset: int) -> TensorInfo:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            qt = GGMLQuantizationType(ttype)
        except ValueError:
            raise GGUFFormatError(f"tensor {name!r} has unknown type id {ttype}") from None
        block, tsize = GGML_QUANT_SIZES[qt]
        n = int(np.prod(shape)) if shape else 1
        if n % block:
            raise GGUFFormatError(f"tensor {name!r}: {n} elements is not a whole number of {qt.name} blocks")
        nbytes = n // block * tsize
        if offset + nbytes > len(self._mm):
            raise GGUFFormatError(
                f"truncated: tensor {name!r} needs bytes {offset}..{offset + nbytes}, file has {len(self._mm)}"
            )
        dtype = {
            GGMLQuantizationType.F32: np.float32,
            GGMLQuantizationType.F16: np.float16,
            GGMLQuantizationType.BF16: np.uint16,
        }.get(qt, np.uint8)
        count = nbytes // np.dtype(dtype).itemsize
        return TensorInfo(name, shape, ttype, np.frombuffer(self._mm, dtype=dtype, count=count, offset=offset))
