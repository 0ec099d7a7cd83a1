"""Writing files so that a failure never leaves a half-written or clobbered file, and checking a target early."""

from __future__ import annotations

import os
import stat
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["check_writable", "write_atomically"]


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, then rename it onto ``path``.

    The rename (``os.replace``) is atomic on POSIX and Windows, so a reader sees the old file or the new
    one, and a failure (an exception, a full disk, a kill) leaves ``path`` as it was. The new file gets the
    mode of the file it replaces, else the umask's default (as ``open(path, "wb")`` would).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_writable(path: str | os.PathLike, what: str, *, directory: bool = False) -> None:
    """Raise ``OSError`` now, before a long computation, if the file (or, with ``directory=True``, the
    directory) ``path`` could not be written later.

    Files and checkpoint directories are written as temporaries in ``path``'s parent and renamed into
    place, so the nearest existing ancestor of the parent must be a directory in which an entry can be made;
    this is tested by making (and removing) an empty temporary directory there.
    """
    path = Path(path)
    if not directory and path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory")
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{what} {path}: {ancestor} is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".pyro-scoreflow-probe-", dir=ancestor)
    except OSError as err:
        raise OSError(f"{what} {path}: cannot write in {ancestor} ({err.strerror or err})") from None
    os.rmdir(probe)
