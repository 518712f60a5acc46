"""Files: names checked before any work is spent, and atomic writes (a temporary file in the
same folder, fsync, rename; spec/FORMAT.md, section 5, "Writing").
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Iterable

from kernelpack.errors import KernelpackError


def _file_mode(path: str) -> int:
    """Keep an existing file's permissions; a new file gets 0o666 less the umask, as open() would."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_UMASK


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: os.umask is process-wide and not thread-safe


def need_file_name(path: Any) -> str:
    """A file name as str: str, bytes or os.PathLike, not empty, without NUL (which the OS
    calls would refuse with a TypeError or ValueError)."""
    try:
        name = os.fsdecode(path)
    except TypeError:
        raise KernelpackError(f"must be a file name (str or os.PathLike), got {type(path).__name__}",
                              field="path") from None
    if name == "" or "\0" in name:
        raise KernelpackError(f"{name!r:.80} is not a file name", field="path")
    return name


def need_output(path: Any) -> str:
    """The name of a file to write, checked before any work is spent on its content: a file
    name (need_file_name), not a folder, in a folder that exists."""
    name = need_file_name(path)
    if os.path.isdir(name):
        raise KernelpackError("is a folder; give a file name to write", path=name)
    folder = os.path.dirname(os.path.abspath(name))
    if not os.path.isdir(folder):
        problem = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise KernelpackError(f"cannot write: '{folder}' {problem}", path=name)
    return name


#: The temporary file's name beside the target (``mkstemp`` adds 8 random characters): short
#: and fixed, so that any name the file system allows for the target (up to NAME_MAX, 255
#: bytes) can be written; hidden, so that a killed writer's leftover is not mistaken for a file.
TEMP_PREFIX, TEMP_SUFFIX = ".kpk-", ".tmp"


def atomic_write(path: str, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path`` atomically: a temporary file in the same folder, fsync,
    rename over ``path``, fsync of the folder (spec/FORMAT.md, section 5, "Writing").

    Any OSError (a read-only folder, a full disk, a name too long) is a KernelpackError
    naming ``path``; the temporary file is removed and ``path`` is left as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _file_mode(path))  # mkstemp makes 0o600
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from None
        raise
    try:  # the rename itself made durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise _write_error(path, exc) from None


def _write_error(path: str, exc: OSError) -> KernelpackError:
    return KernelpackError(f"cannot write: {exc.strerror or exc}", path=path)
