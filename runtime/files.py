"""The command line's files: output paths checked up front and written atomically (a
temporary file in the same folder, then a rename); input arrays read safely."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stagebundle.errors import fail

__all__ = ["write_atomic", "check_writable", "save_outputs", "load_inputs"]


def write_atomic(path: str | Path, data: bytes, private: bool = False) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new, never half.

    ``private``: readable by the owner only (keys); else 0644.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_inputs(items: Sequence[str]) -> dict[str, np.ndarray]:
    """``NAME=FILE.npy`` items -> arrays (``allow_pickle=False``: .npy data only).

    The file is mapped first, so a header that claims more data than the file holds is
    refused before anything is allocated; arrays come back in native byte order.
    """
    out: dict[str, np.ndarray] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            fail(f"--input {item!r}: expected NAME=FILE.npy")
        if name in out:
            fail(f"--input {name}: given twice")
        try:
            arr = np.load(path, allow_pickle=False, mmap_mode="r")
            if isinstance(arr, np.ndarray):
                arr = np.array(arr, dtype=arr.dtype.newbyteorder("="))
        except (OSError, ValueError, MemoryError) as err:
            fail(f"--input {name}: cannot read {path} as .npy ({err})")
        if not isinstance(arr, np.ndarray):
            arr.close()
            fail(f"--input {name}: {path} is an .npz archive, expected one .npy array")
        out[name] = arr
    return out


def check_writable(path: str | Path, what: str = "-o") -> None:
    """Refuse an output path whose folder is missing, not a folder, or not writable, or
    that names something other than a regular file (a device such as /dev/null would be
    replaced by the atomic rename), before any work is done."""
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        fail(f"{what} {path}: folder {folder} does not exist")
    if Path(path).is_dir():
        fail(f"{what} {path}: is a folder")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as err:
        fail(f"{what} {path}: cannot check it ({err.strerror or err})")
    if mode is not None and not stat.S_ISREG(mode):
        fail(f"{what} {path}: exists and is not a regular file (it would be replaced)")
    if not os.access(folder, os.W_OK | os.X_OK):
        fail(f"{what} {path}: folder {folder} is not writable")


def save_outputs(path: str | Path, outputs: dict[str, np.ndarray]) -> None:
    """Write ``outputs`` to ``path`` as .npz, atomically (temp file, then ``os.replace``)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz",
                                   dir=path.parent if str(path.parent) else ".")
    except OSError as err:
        fail(f"-o {path}: cannot write there ({err.strerror or err})")
    try:
        os.fchmod(fd, 0o644)  # as runtime.files.write_atomic (mkstemp makes it 0600)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, allow_pickle=False, **outputs)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
