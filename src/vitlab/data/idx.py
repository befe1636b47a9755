"""Reader for the IDX format of MNIST and Fashion-MNIST (http://yann.lecun.com/exdb/mnist/, bottom of the page).

A file is a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian uint32 sizes, then the
data in C order, big-endian. Files are usually gzip-compressed; both forms are read.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vitlab.errors import VitlabError

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_maybe_gzip(path: str | Path) -> bytes:
    """The bytes of ``path``, decompressed if it is gzip (recognised by its magic bytes, not by the name)."""
    raw = Path(path).read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise VitlabError(f"{path} is a corrupt gzip file ({e}); delete it and get it again") from e


def parse_idx(data: bytes, *, source: str = "IDX data") -> Tensor:
    """Decode IDX bytes to a tensor of the stored shape and type (native byte order)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise VitlabError(f"{source} is not an IDX file (magic number {data[:4].hex() or 'missing'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise VitlabError(f"{source} is truncated: its header ends after {len(data)} bytes")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_DTYPES[data[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - header != expected:
        raise VitlabError(
            f"{source} is corrupt: its header promises shape {shape} ({expected} bytes of data) but it holds"
            f" {len(data) - header} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("=")))  # astype copies: frombuffer is read-only


def read_idx(path: str | Path) -> Tensor:
    """Read an IDX file, gzip-compressed or not."""
    return parse_idx(read_maybe_gzip(path), source=str(path))


def write_idx(path: str | Path, array: np.ndarray | Tensor) -> None:
    """Write ``array`` as IDX (gzip-compressed when ``path`` ends in .gz); the inverse of `read_idx`."""
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _DTYPES.items()}
    code = codes[array.dtype.newbyteorder("=")]
    data = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(_DTYPES[code]).tobytes()
    Path(path).write_bytes(gzip.compress(data) if str(path).endswith(".gz") else data)
