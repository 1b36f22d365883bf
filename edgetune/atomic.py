"""Crash-safe writes: every file or folder edgetune replaces goes through here.

Files: a reader sees either the old file or the whole new one. Data goes to a temp file in the
same folder, is fsynced, renamed over the target, and the folder is fsynced so the rename
survives a power cut. On failure the temp file is removed and the OSError propagates (callers
turn it into a message that names the file); an existing target stays as it was.

Folders (a bundle): ``replace_dir`` swaps a finished folder in so that the output path always
holds either the old folder or the new one (see there). ``is_disk_full`` tells a full disk from
other write failures by errno, also when a library hid the errno in its own exception.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not every platform can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: Path | str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(folder: Path | str) -> None:
    """fsync every file below ``folder``, then every folder, deepest first."""
    folder = Path(folder)
    folders = [folder]
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_file():
            fsync_file(path)
        elif path.is_dir():
            folders.append(path)
    for d in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)


def replace_file(tmp: Path | str, path: Path | str) -> None:
    """Rename the already fsynced ``tmp`` over ``path`` (same folder) and make the rename durable."""
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # mkstemp's 0600 would surprise whoever reads the file later
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    fsync_dir(path.parent)


# --- folders ---------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100  # linux/fcntl.h: paths are relative to the working directory


def _renameat2():
    """libc's renameat2, or None where there is none (not Linux, glibc < 2.28, musl without it)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: Path | str, b: Path | str) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the platform or file system cannot (the caller falls back); raises
    OSError for a real failure.
    """
    fn = _renameat2()
    if fn is None:
        return False
    import ctypes

    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EINVAL), errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _old_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.old-{time.time_ns()}")


def replace_dir(new: Path | str, out: Path | str) -> None:
    """Move the finished folder ``new`` to ``out`` (same parent); an existing ``out`` is removed after.

    The output path is never without a complete folder: with ``out`` present the two are swapped
    in one atomic step (``exchange``), then the old one, now at ``new``, is deleted. Where no
    atomic swap exists the old folder is renamed aside to ``.<name>.old-<ns>``, the new one
    renamed in, and if that fails the old one is renamed back; a kill between those two renames
    leaves the old folder aside, and ``recover_dir(out)`` (run at the start of the next write)
    puts it back. ``new`` is fsynced before it becomes visible.
    """
    new, out = Path(new), Path(out)
    fsync_tree(new)
    if not out.exists() and not out.is_symlink():
        os.rename(new, out)
        fsync_dir(out.parent)
        return
    if exchange(new, out):
        fsync_dir(out.parent)
        shutil.rmtree(new, ignore_errors=True)  # the old folder, now under the temp name
        return
    old = _old_name(out)
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(out: Path | str) -> Path | None:
    """If ``out`` is missing but a folder ``replace_dir`` set aside is there, put the newest back.

    Returns the folder restored, or None. Leftover set-aside folders next to a present ``out``
    are deleted (they are older copies of it).
    """
    out = Path(out)
    if not out.parent.is_dir():
        return None
    aside = sorted((p for p in out.parent.glob(f".{out.name}.old-*") if p.is_dir() and not p.is_symlink()),
                   key=lambda p: p.name)
    restored = None
    if aside and not out.exists() and not out.is_symlink():
        restored = aside.pop()
        os.rename(restored, out)
        fsync_dir(out.parent)
    for p in aside:
        shutil.rmtree(p, ignore_errors=True)
    return restored


# --- a full disk -----------------------------------------------------------------------------
_PROBE_BYTES = 1 << 16


def is_disk_full(exc: BaseException, folder: Path | str) -> bool:
    """Whether ``exc``, raised while writing into ``folder``, means the disk (or quota) is full.

    An OSError says so by its errno. Libraries that write through their own code (ONNX
    Runtime's checkpoint writer raises a RuntimeError) hide the errno; for those the file
    system is asked directly: a 64 KiB probe file is written and fsynced in ``folder``, and a
    full disk answers with ENOSPC/EDQUOT. The message text is never parsed. Ask before deleting
    the partial output, or its freed space hides the full disk. Before a large write whose size
    is known, ``ensure_free_space`` refuses early with a real ENOSPC instead.
    """
    if isinstance(exc, OSError):
        return exc.errno in FULL_DISK_ERRNOS
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: not a write failure
        return False
    folder = Path(folder)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".disk-probe.", dir=folder)
    except OSError as err:
        return err.errno in FULL_DISK_ERRNOS
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * _PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
        return False
    except OSError as err:
        return err.errno in FULL_DISK_ERRNOS
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)


def ensure_free_space(folder: Path | str, needed: int) -> None:
    """Raise OSError(ENOSPC) if ``folder``'s file system has fewer than ``needed`` bytes free.

    For writes done by a library that hides the errno (ONNX Runtime's checkpoint writer): a
    caller that knows the size (e.g. the previous checkpoint's) checks before writing.
    """
    folder = Path(folder)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free} bytes free, {needed} needed)", str(folder))
