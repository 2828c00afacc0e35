"""A minimal, fast GGUF reader: metadata into Python values, tensors as numpy views of one read-only mmap.

``gguf.GGUFReader`` builds a numpy memmap object per metadata part, which costs ~1.2 s for a 16k-token vocabulary;
this reader parses the header with ``struct`` (tens of milliseconds) and maps tensor data without copying. Every
out-of-bounds read — a truncated or corrupt file — raises :class:`GGUFFormatError` with the offset.

Hostile headers: every count (keys, tensors, array elements, tensor elements) is checked against the bytes left in
the file *before* anything is allocated or iterated, so one patched number fails in microseconds instead of looping
for minutes; only regular files are opened (a FIFO named ``x.gguf`` would block ``open`` forever). Keys and tensor
names must be unique, and tensor data must be laid out as llama.cpp's ``gguf.cpp`` requires: each tensor's offset is
exactly where the previous one's (aligned) bytes end, so no offset can point into another tensor's data.

:meth:`GGUFFile.content_digest` is the checksum of what a file means rather than how it is laid out (metadata records
as written, tensor names, types, shapes and data; not the padding or offsets): XXH3-128 (:func:`hex_digest`, in Rust
with the GIL held) or, for files exported before it, SHA-256. nanochat's exports store it under a key and the
loader recomputes it (``nanochat.export.gguf_io``).

Memory: tensors are views of one read-only shared mapping, so reading them costs page cache, not private memory; but
every page touched counts in the process's RSS while mapped. :meth:`GGUFFile.drop_pages` hands them back once their
contents live elsewhere (the Rust engine's copy); the views stay valid and fault the bytes back in if read again.

:class:`LoadError` lives here, at the bottom of the loaders' imports: it is the one exception type that every
model and checkpoint loader raises (``GGUFError``, ``GGUFFormatError`` and the checkpoint loader's error subclass
it), always with the file's path and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import stat
import struct
from collections.abc import Sequence
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
# smallest encodings, used to bound counts by the bytes left: a key is a u64 length + u32 type + >= 1 byte of value;
# a tensor record is a u64 name length + u32 n_dims + u32 type + u64 offset; array elements by their type
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
_MIN_ELEMENT_BYTES = {_STRING: 8, _ARRAY: 4 + 8}


LAZY_STRING_ARRAY = 256  # string arrays at least this long are decoded on first access (a tokenizer's tokens, merges)


class _LazyStrings:
    """A string array's place in the map: ``count`` length-prefixed strings from ``offset`` (already bounds-checked)."""

    __slots__ = ("count", "offset")

    def __init__(self, offset: int, count: int) -> None:
        self.offset, self.count = offset, count


class Fields(dict[str, Any]):
    """Metadata values by key. Long string arrays (a tokenizer's 16k tokens and merges: ~10 ms of decoding) are
    decoded when first read, so a loader that builds its tokenizer from the cached JSON never pays for them;
    :meth:`array_len` gives an array's length without decoding it."""

    def __init__(self, decode: Any) -> None:
        super().__init__()
        self._decode = decode

    def __getitem__(self, key: str) -> Any:
        v = super().__getitem__(key)
        if isinstance(v, _LazyStrings):
            v = self._decode(v)
            super().__setitem__(key, v)
        return v

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def values(self) -> list[Any]:  # type: ignore[override]
        return [self[k] for k in self]

    def items(self) -> list[tuple[str, Any]]:  # type: ignore[override]
        return [(k, self[k]) for k in self]

    def array_len(self, key: str) -> int | None:
        """Length of the array under ``key`` (None if absent or not an array), without decoding it."""
        if key not in self:
            return None
        v = super().__getitem__(key)
        return v.count if isinstance(v, _LazyStrings) else len(v) if isinstance(v, list) else None


class LoadError(ValueError):
    """A model or checkpoint file we cannot use; the message names the file and what is wrong with it."""


class GGUFFormatError(LoadError):
    """The GGUF container itself is malformed (truncated, a count or offset out of bounds, a bad value type)."""


def hex_digest(algo: str, parts: Sequence[bytes | np.ndarray]) -> str:
    """Hex checksum of the concatenation of ``parts`` (bytes or contiguous uint8 arrays): ``"xxh3_128"`` (32 hex
    digits, Rust) or ``"sha256"`` (64, hashlib; what exports wrote before XXH3)."""
    if algo == "xxh3_128":
        from nanochat.ops.native import xxh3_128_hex

        return xxh3_128_hex(parts)
    if algo == "sha256":
        h = hashlib.sha256()
        for part in parts:
            h.update(part if isinstance(part, bytes) else part.data)
        return h.hexdigest()
    raise ValueError(f"unknown checksum algorithm {algo!r} (xxh3_128 or sha256)")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def check_regular_file(path: str | os.PathLike[str]) -> os.stat_result:
    """``os.stat(path)``, refusing anything but a regular file with :class:`LoadError` (before any ``open``: opening a
    FIFO blocks until a writer comes, and a directory fails later with a confusing ``No such device``).
    A missing path raises ``FileNotFoundError`` naming it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file or directory") from None
    except OSError as e:
        raise LoadError(f"{path}: cannot stat ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise LoadError(f"{path}: expected a regular file, found {_kind(st.st_mode)}")
    return st


def open_regular(path: str | os.PathLike[str]) -> int:
    """A read-only file descriptor of ``path``, which must be a regular file. Opened non-blocking and checked with
    ``fstat`` on the descriptor, so a FIFO swapped in after a ``stat`` cannot block us either."""
    check_regular_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise LoadError(f"{path}: cannot open ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise LoadError(f"{path}: expected a regular file, found {_kind(st.st_mode)}")
    os.set_blocking(fd, True)
    return fd


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne[0] (the fastest-varying, i.e. columns) first
    type: int  # ggml type id
    data: np.ndarray  # raw view: float32/float16/uint16 for float types, uint8 bytes for quantized ones


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        fd = open_regular(self.path)
        try:
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError) as e:  # an empty file
            raise GGUFFormatError(f"cannot map the file: {e}") from None
        finally:
            os.close(fd)
        self._off = 0
        magic = self._read(4)
        if magic != b"GGUF":
            raise GGUFFormatError(f"bad magic {magic!r}")
        self.version = self._scalar("<I")
        if self.version not in (2, 3):
            raise GGUFFormatError(f"unsupported GGUF version {self.version}")
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")
        left = len(self._mm) - self._off
        if n_tensors > 1 << 20 or n_kv > 1 << 20 or n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > left:
            raise GGUFFormatError(
                f"implausible counts: {n_tensors} tensors and {n_kv} keys in a {len(self._mm)}-byte file"
            )
        self.fields = Fields(self._decode_strings)
        self.kv_spans: dict[str, tuple[int, int]] = {}  # key -> its record's byte range (key, type and value)
        for _ in range(n_kv):
            start = self._off
            key = self._string()
            if key in self.fields:  # a second value would silently replace the first (llama.cpp refuses too)
                raise GGUFFormatError(f"duplicate key {key!r} at offset {start}")
            self.fields[key] = self._value(self._scalar("<I"))
            self.kv_spans[key] = (start, self._off)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            nd = self._scalar("<I")
            if nd > 8:
                raise GGUFFormatError(f"tensor {name!r} has {nd} dimensions")
            shape = tuple(self._scalar("<Q") for _ in range(nd))
            infos.append((name, shape, self._scalar("<I"), self._scalar("<Q")))
        names = [n for n, *_ in infos]
        if len(set(names)) != len(names):
            dup = next(n for i, n in enumerate(names) if n in names[:i])
            raise GGUFFormatError(f"tensor {dup!r} appears twice in the tensor directory")
        align = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        # llama.cpp's rule (gguf.cpp): a positive power of two; 0 would divide by zero below
        if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFFormatError(f"general.alignment must be a positive power of two, got {align!r}")
        data_start = (self._off + align - 1) // align * align
        self.tensors = []
        expected = 0  # llama.cpp's gguf.cpp: tensors follow each other in directory order, each padded to `align`
        for n, s, t, o in infos:
            if o != expected:
                raise GGUFFormatError(
                    f"tensor {n!r} has data offset {o}, expected {expected} (where the previous tensor ends): "
                    "offsets must not skip ahead or point into another tensor's data"
                )
            info = self._tensor(n, s, t, data_start + o)
            self.tensors.append(info)
            expected += (info.data.nbytes + align - 1) // align * align

    def content_digest(self, exclude: tuple[str, ...] = (), algo: str = "xxh3_128") -> str:
        """Checksum (hex, :func:`hex_digest`'s ``algo``) of the metadata records except the keys in ``exclude`` (each
        record's bytes as written, in file order) and of every tensor's name, type, shape and data: what a reader of
        the file gets, but not where it lies (alignment and padding may change, e.g. when gguf's writer copies a
        file). Every part is a view of the map (no copy)."""
        parts: list[bytes | np.ndarray] = [struct.pack("<IQ", self.version, len(self.tensors))]
        whole = np.frombuffer(self._mm, dtype=np.uint8)
        for key, (a, b) in self.kv_spans.items():
            if key not in exclude:
                parts.append(whole[a:b])
        for t in self.tensors:
            name = t.name.encode()
            parts.append(
                struct.pack(f"<Q{len(name)}sII{len(t.shape)}Q", len(name), name, t.type, len(t.shape), *t.shape)
            )
            parts.append(t.data.view(np.uint8))  # the array's own buffer: a view of the map, contiguous
        return hex_digest(algo, parts)

    def drop_pages(self) -> None:
        """Release the file's pages from this process's resident set (``MADV_DONTNEED`` on the shared read-only map):
        for after the data was copied elsewhere. Views stay valid: a later read faults the bytes back in from the page
        cache or the file."""
        if hasattr(mmap, "MADV_DONTNEED"):  # Linux and most Unix; elsewhere the pages simply stay
            self._mm.madvise(mmap.MADV_DONTNEED)

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
            min_size = _MIN_ELEMENT_BYTES.get(etype) or struct.calcsize(_SCALARS.get(etype, "<B"))
            if count * min_size > len(self._mm) - self._off:  # before iterating: a patched count fails at once
                raise GGUFFormatError(
                    f"array of {count} elements at offset {self._off} does not fit in the {len(self._mm)}-byte file"
                )
            if etype in _NP_ARRAY:
                dt = np.dtype(_NP_ARRAY[etype]).newbyteorder("<")
                raw = self._read(count * dt.itemsize)
                return np.frombuffer(raw, dtype=dt).tolist()
            if etype == _STRING:
                start = self._off
                if count >= LAZY_STRING_ARRAY:  # walk the lengths now (bounds), decode on first access
                    self._off = self._walk_strings(start, count, None)
                    return _LazyStrings(start, count)
                out: list[str] = []
                self._off = self._walk_strings(start, count, out)
                return out
            return [self._value(etype) for _ in range(count)]
        raise GGUFFormatError(f"unknown metadata value type {vtype} at offset {self._off}")

    def _walk_strings(self, off: int, count: int, out: list[str] | None) -> int:
        """The end of ``count`` length-prefixed strings from ``off``, each bounds-checked; decoded into ``out`` if
        given. The hot loop of a tokenizer: the reads are inlined."""
        mm, size, unpack = self._mm, len(self._mm), struct.unpack_from
        for _ in range(count):
            if off + 8 > size:
                raise GGUFFormatError(f"truncated string array at offset {off}")
            (n,) = unpack("<Q", mm, off)
            off += 8
            if off + n > size:
                raise GGUFFormatError(f"truncated string array at offset {off}")
            if out is not None:
                out.append(mm[off : off + n].decode("utf-8", errors="replace"))
            off += n
        return off

    def _decode_strings(self, lazy: _LazyStrings) -> list[str]:
        out: list[str] = []
        self._walk_strings(lazy.offset, lazy.count, out)
        return out

    def _tensor(self, name: str, shape: tuple[int, ...], ttype: int, offset: int) -> TensorInfo:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            qt = GGMLQuantizationType(ttype)
        except ValueError:
            raise GGUFFormatError(f"tensor {name!r} has unknown type id {ttype}") from None
        block, tsize = GGML_QUANT_SIZES[qt]
        n = math.prod(shape)  # Python ints: np.prod would wrap around on patched dims
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
