"""A small reader of the GGUF container (versions 2 and 3, little-endian): metadata as plain
Python values, tensors as memory-mapped byte views, nothing dequantized.

Format: magic ``GGUF``, version u32, tensor count u64, metadata count u64; then each metadata
entry (key string, value type u32, value); then each tensor's info (name string, dimension
count u32, dimensions u64 innermost first, type u32, offset u64); then, from the next multiple
of ``general.alignment`` (default 32), the tensor data. Strings are a u64 length + UTF-8 bytes.

Parsing the header is a few tight loops over ``struct.unpack_from`` (a vocabulary of 100k
strings takes well under a second). Dequantizing is ``gguf.quants.dequantize``'s job.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .errors import CheckpointError, UnsupportedModelError

# value type id -> (struct format, numpy dtype)
_SCALARS = {0: ("<B", "u1"), 1: ("<b", "i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"),
            5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "?"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"),
            12: ("<d", "<f8")}
_STRING, _ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS


class GGUFTensor(NamedTuple):
    name: str
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy / HF order (GGUF lists the innermost dimension first)
    data: np.ndarray  # uint8 memory-mapped bytes, shaped [*shape[:-1], bytes per row]


class _Cursor:
    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt):
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return out[0] if len(out) == 1 else out

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise struct.error("string runs past the end of the file")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype][0])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, n = self.unpack("<I"), self.unpack("<Q")
            if itype in _SCALARS:  # one numpy read for the whole array
                dt = np.dtype(_SCALARS[itype][1])
                if self.pos + n * dt.itemsize > len(self.buf):
                    raise struct.error("array runs past the end of the file")
                out = np.frombuffer(self.buf, dt, n, self.pos).tolist()
                self.pos += n * dt.itemsize
                return out
            if depth >= 4:
                raise CheckpointError(f"{self.path}: GGUF metadata arrays nested more than 4 deep at byte {self.pos}")
            if self.pos + n * (8 if itype == _STRING else 12) > len(self.buf):  # each item's least size
                raise struct.error("array runs past the end of the file")
            return [self.value(itype, depth + 1) for _ in range(n)]
        raise CheckpointError(f"{self.path}: unknown GGUF metadata value type {vtype} at byte {self.pos}")


class GGUFFile:
    """``metadata``: {key: value}; ``tensors``: {name: GGUFTensor}, in file order."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"GGUF file {str(self.path)!r} does not exist")
        size = self.path.stat().st_size
        buf = np.memmap(self.path, mode="r", dtype=np.uint8) if size else np.zeros(0, np.uint8)
        if len(buf) < 24 or bytes(buf[:4]) != b"GGUF":
            raise CheckpointError(f"{self.path}: not a GGUF file (no 'GGUF' magic at its start)")
        c = _Cursor(buf, self.path)
        c.pos = 4
        try:
            version = c.unpack("<I")
            if version not in (2, 3):
                raise UnsupportedModelError(
                    f"{self.path}: GGUF version {version} (or a big-endian file) is not supported; supported: 2, 3")
            n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
            # every metadata entry takes >= 12 bytes and every tensor info >= 24: larger counts
            # cannot fit in the file (and would loop for a very long time)
            if n_kv * 12 + n_tensors * 24 > len(buf):
                raise CheckpointError(f"{self.path}: truncated or corrupt GGUF header (it claims {n_tensors} tensors "
                                      f"and {n_kv} metadata entries, more than a {len(buf)}-byte file can hold)")
            self.metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = c.string()
                if key in self.metadata:
                    raise CheckpointError(f"{self.path}: GGUF metadata key {key!r} appears twice")
                self.metadata[key] = c.value(c.unpack("<I"))
            infos = []
            names = set()
            for _ in range(n_tensors):
                name = c.string()
                if name in names:
                    raise CheckpointError(f"{self.path}: tensor {name!r} appears twice in the GGUF header")
                names.add(name)
                n_dims = c.unpack("<I")
                if not 1 <= n_dims <= MAX_DIMS:
                    raise CheckpointError(f"{self.path}: tensor {name!r} has {n_dims} dimensions; "
                                          f"GGUF tensors have 1 to {MAX_DIMS}")
                dims = [c.unpack("<Q") for _ in range(n_dims)]
                infos.append((name, dims, c.unpack("<I"), c.unpack("<Q")))
        except (struct.error, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: truncated or corrupt GGUF header ({e})") from None
        align = self.metadata.get("general.alignment", 32)
        if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align % 8:
            raise CheckpointError(f"{self.path}: key 'general.alignment': expected a positive multiple of 8, "
                                  f"got {align!r}")
        start = -(-c.pos // align) * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, type_id, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
            except ValueError:
                raise UnsupportedModelError(f"{self.path}: tensor {name!r} has unknown GGML type id {type_id}") from None
            if qtype not in gguf.GGML_QUANT_SIZES:
                raise UnsupportedModelError(f"{self.path}: tensor {name!r} has GGML type {qtype.name}, "
                                            f"which has no known block size")
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            if dims[0] % block:
                raise CheckpointError(f"{self.path}: tensor {name!r} has shape {dims} (GGUF order), "
                                      f"not a whole number of {qtype.name} blocks of {block}")
            row_bytes = dims[0] // block * type_size
            rows = math.prod(dims[1:])  # Python ints: no overflow whatever the header says
            begin = start + offset
            if begin + rows * row_bytes > len(buf):
                raise CheckpointError(f"{self.path}: tensor {name!r} runs past the end of the file "
                                      f"(truncated? {len(buf)} bytes)")
            data = buf[begin:begin + rows * row_bytes].reshape(*reversed(dims[1:]), row_bytes)
            self.tensors[name] = GGUFTensor(name, qtype, tuple(int(d) for d in reversed(dims)), data)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header (the tensor data stays memory-mapped)."""
    return GGUFFile(path)
