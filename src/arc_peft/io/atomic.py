"""Atomic file and folder replacement: readers see the old file (folder) or the new one, never
a mix.

The bytes go to a temporary file in the destination's folder (``os.replace`` is atomic only
within one file system), which is flushed, ``fsync``ed and moved over the destination. The
temporary file is removed on any failure, Ctrl-C included; one left by a killed process is
removed by a later save to the same file once it is stale (see ``_sweep``).

A folder of several files (``arc_peft.save_adapter_folder``) is written whole into a new
temporary folder next to it, which then takes the folder's place in one step: Linux's
``renameat2(RENAME_EXCHANGE)`` swaps the two names atomically, so the folder's name always
holds one complete save (see ``replace_folder``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import re
import shutil
import socket
import stat
import sys
import time
import uuid
from collections.abc import Callable, Collection

__all__ = ["replace_folder", "write_atomic"]

# Temporary names are ".<destination name, cut to this many characters>.<host>-<pid>-<random>.tmp":
# cut so that a destination name near the file system's 255-byte limit still leaves room.
_NAME_KEEP = 100
# A temporary file this old is abandoned whoever wrote it: a save of an adapter file takes
# milliseconds to seconds.
_STALE_AFTER_S = 600.0


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _pattern(base: str, suffix: str = "tmp") -> re.Pattern[str]:
    return re.compile(
        re.escape(f".{base[:_NAME_KEEP]}.") + r"([0-9a-f]{8})-([0-9]+)-[0-9a-f]{12}\." + suffix
    )


def _alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def _sweep(folder: str, base: str, suffix: str = "tmp") -> None:
    """Remove temporary files (``suffix="tmpdir"``: folders) of earlier saves to ``base`` that
    were left behind by a killed process: written on this host by a process that no longer
    exists, or older than ``_STALE_AFTER_S`` (a writer on another host sharing the folder)."""
    pattern, host, now = _pattern(base, suffix), _host_tag(), time.time()
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = pattern.fullmatch(entry.name)
            if match is None:
                continue
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                dead = match.group(1) == host and not _alive(int(match.group(2)))
                if not (dead or now - info.st_mtime > _STALE_AFTER_S):
                    continue
                if suffix == "tmp" and stat.S_ISREG(info.st_mode):
                    os.unlink(entry.path)
                elif suffix == "tmpdir":
                    _remove(entry.path)


def _remove(path: str) -> None:
    """Remove a file, link or folder tree without following links (a planted link inside a
    replaced folder must not take its target with it)."""
    info = os.lstat(path)
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path)  # does not follow links inside
    else:
        os.unlink(path)


def _token() -> str:
    return f"{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _fsync_dir(folder: str) -> None:
    # Makes renames in ``folder`` durable; not every platform can open a directory (Windows).
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _exchange_call() -> Callable[[str, str], None] | None:
    """Linux's ``renameat2(RENAME_EXCHANGE)`` (glibc 2.28+), or ``None`` where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return None
    at_fdcwd, rename_exchange = -100, 2

    def exchange(a: str, b: str) -> None:
        if call(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), a, None, b)

    return exchange


def replace_folder(folder: str, write: Callable[[str], None], own: Collection[str]) -> None:
    """Make ``folder`` hold exactly what ``write(temporary folder)`` puts in a new folder, in
    one atomic step where the system allows.

    ``write`` fills a temporary folder next to ``folder`` (same file system); its files are
    ``fsync``ed, then it is swapped with ``folder`` (``renameat2(RENAME_EXCHANGE)``: a reader
    of the name sees the old folder or the new one, never a mix or nothing) and the old one is
    removed, links in it unfollowed. A link at ``folder`` is replaced, not followed. Where
    the system cannot swap (not Linux, a file system without ``RENAME_EXCHANGE``) the old
    folder is moved aside first: for a moment the name holds nothing, never a mix.

    ``own`` names the entries the folder may hold: an existing folder holding anything else
    is refused (``ValueError``) before anything is written, as the swap would discard it.
    A failure or a kill leaves ``folder`` as it was; a killed save's temporary folder is
    removed by a later save once stale (as ``write_atomic``'s temporary files)."""
    folder = os.path.abspath(folder)
    parent, base = os.path.split(folder)
    try:
        info: os.stat_result | None = os.lstat(folder)
    except FileNotFoundError:
        info = None
    if info is not None and stat.S_ISDIR(info.st_mode):
        cwd = os.getcwd()
        if cwd == folder or cwd.startswith(os.path.join(folder, "")):
            # The process would be left in the removed old folder.
            raise ValueError(
                f"{folder} is (or holds) the current working directory, which replacing the "
                "folder would remove: save into another folder, or chdir out of it first"
            )
        other = sorted(n for n in os.listdir(folder) if n not in own and not _own_temporary(n, own))
        if other:
            raise ValueError(
                f"{folder} holds {other[:5]}{' and more' if len(other) > 5 else ''}, which "
                "saving an adapter folder would discard (the folder is replaced whole, so "
                "that readers never see a mix of two saves): save into a folder of its own"
            )
    elif info is not None and not stat.S_ISLNK(info.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a folder", folder)
    _sweep(parent, base, "tmpdir")
    tmp = os.path.join(parent, f".{base[:_NAME_KEEP]}.{_token()}.tmpdir")
    os.mkdir(tmp)
    try:
        if info is not None and stat.S_ISDIR(info.st_mode):
            os.chmod(tmp, stat.S_IMODE(info.st_mode))
        write(tmp)
        _fsync_dir(tmp)
        _swap_in(tmp, folder)
    finally:
        with contextlib.suppress(OSError):
            _remove(tmp)  # the unfinished new folder, or after the swap the old one
    _fsync_dir(parent)


def _own_temporary(name: str, own: Collection[str]) -> bool:
    return any(_pattern(n).fullmatch(name) for n in own)


def _swap_in(tmp: str, folder: str) -> None:
    """Put ``tmp`` at ``folder``; then ``tmp`` holds what ``folder`` held (or nothing)."""
    exchange = _exchange_call()
    for _ in range(100):  # another saver may create or remove the folder in between
        if not os.path.lexists(folder):
            try:
                os.rename(tmp, folder)  # atomic; fails if another save put a folder there
                return
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                continue
        if exchange is not None:
            try:
                exchange(tmp, folder)
                return
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue  # removed meanwhile: rename into place instead
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                exchange = None  # this file system cannot swap
        parent, base = os.path.split(folder)
        aside = os.path.join(parent, f".{base[:_NAME_KEEP]}.{_token()}.tmpdir")
        try:
            os.rename(folder, aside)
        except FileNotFoundError:
            continue
        os.rename(tmp, folder)
        os.rename(aside, tmp)
        return
    raise OSError(errno.EBUSY, "other saves keep replacing the folder", folder)


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically.

    A symlink at ``path`` is written through (its target is replaced, the link stays); an
    existing file keeps its permission bits; a new one gets the usual ``0o666 & ~umask``.
    """
    target = os.path.realpath(path) if os.path.islink(path) else path
    folder = os.path.dirname(os.path.abspath(target))
    base = os.path.basename(target)
    try:
        mode: int | None = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        mode = None
    _sweep(folder, base)
    tmp = os.path.join(folder, f".{base[:_NAME_KEEP]}.{_token()}.tmp")
    fd = -1
    try:
        # O_EXCL: never follow or reuse someone else's file; 0o666 lets the umask apply as for
        # any ordinary file (mkstemp would force 0o600). Inside the try, so that an interrupt
        # arriving as the file is created still removes it.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as handle:
            fd = -1  # the file object owns it now
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        # The name is unique to this call (pid and 48 random bits), so the file is ours unless
        # O_EXCL found it already there.
        if not isinstance(exc, FileExistsError):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    _fsync_dir(folder)  # make the rename itself durable
