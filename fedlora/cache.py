"""Entries of the disk cache (decoded data sets, partitions, tokens): written aside, then renamed, so
that the processes of a run that write one at once, or map it, never see it half-written; and an
.npz entry read back as memory maps of the file, which its readers share."""

from __future__ import annotations

import os
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write(file)` into a file of its own beside `path`, then renamed onto it: several Ray actors may
    write the same entry at once, and a process that maps it never sees it half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix + ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(path: Path, **arrays: np.ndarray) -> None:
    """np.savez into `path`, written aside, then renamed (`write_atomic`)."""
    write_atomic(path, lambda f: np.savez(f, **arrays))


def read_npz_mapped(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz written by `save_atomic` (np.savez: uncompressed members) as copy-on-write
    memory maps of the file, which np.load cannot give for an .npz. The processes of a run that read
    the same data set (the server, the client actors) then share its pages, the system's page cache,
    instead of each holding a copy, and a process holds only the pages of the rows it reads (an
    actor: its clients'). A compressed member is read into memory."""
    arrays = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                with z.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member)
                continue
            f.seek(info.header_offset)
            local = f.read(30)  # a zip member's local header, then its name and extra field, then the .npy
            if local[:4] != b"PK\x03\x04":
                raise zipfile.BadZipFile(f"{path}: member {info.filename} has no local header")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name_length + extra_length)
            fmt = np.lib.format
            version = fmt.read_magic(f)
            if version not in ((1, 0), (2, 0)):  # 3.0's header is UTF-8: read, not mapped
                with z.open(info) as member:
                    arrays[name] = fmt.read_array(member)
                continue
            shape, fortran, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
            order = "F" if fortran else "C"
            if dtype.hasobject:
                raise ValueError(f"{path}: member {info.filename} holds Python objects")
            if 0 in shape:  # nothing to map
                arrays[name] = np.zeros(shape, dtype, order=order)
                continue
            arrays[name] = np.memmap(path, dtype, "c", f.tell(), shape, order).view(np.ndarray)
    return arrays
