"""Folders written all at once: a save killed at any moment leaves the old folder or the new one.

:func:`atomic_folder` yields a temporary folder beside the destination; when the block ends without
an error the two are swapped in one step (``renameat2(RENAME_EXCHANGE)`` on Linux) and the old
content is removed; on an error the temporary folder is removed and the destination is untouched.
Where the exchange is unavailable the old folder is renamed aside first (a kill between the two
renames leaves it beside the destination as ``.NAME.old-*``, never lost). :func:`sha256_file` lets a
reader check that the files of a folder belong together.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def check_destination(path, allowed: Iterable[str], what: str) -> Path:
    """`path` as a folder this module may replace: absent, empty, or holding only `allowed` files.

    Raises ``ValueError`` naming the path and the fix otherwise (a file; a folder with other files,
    which a replacement would delete)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a file; give a folder (it is created if missing)")
    if path.is_dir():
        other = sorted(p.name for p in path.iterdir() if p.name not in set(allowed))
        if other:
            raise ValueError(f"{what} {str(path)!r} holds other files ({', '.join(other[:5])}); give a new or empty folder")
    return path


@contextlib.contextmanager
def atomic_folder(path, allowed: Iterable[str], what: str = "folder") -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it becomes `path` in one step (see the module)."""
    path = check_destination(path, allowed, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():  # the content is on disk before the swap makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _swap_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap: the old content


def _swap_into_place(new: Path, path: Path) -> None:
    if not path.exists():
        os.rename(new, path)
        return
    if _exchange(new, path):
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rename(path, old / "old")
    os.rename(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, f"cannot swap {a} into place at {b}: {os.strerror(err)}")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
