"""Atomic file replacement: readers see the old file or the new one, never a mix.

The bytes go to a temporary file in the destination's folder (``os.replace`` is atomic only
within one file system), which is flushed, ``fsync``ed and moved over the destination. The
temporary file is removed on any failure, Ctrl-C included; one left by a killed process is
removed by a later save to the same file once it is stale (see ``_sweep``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import stat
import time
import uuid

__all__ = ["write_atomic"]

# Temporary names are ".<destination name, cut to this many characters>.<host>-<pid>-<random>.tmp":
# cut so that a destination name near the file system's 255-byte limit still leaves room.
_NAME_KEEP = 100
# A temporary file this old is abandoned whoever wrote it: a save of an adapter file takes
# milliseconds to seconds.
_STALE_AFTER_S = 600.0


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _pattern(base: str) -> re.Pattern[str]:
    return re.compile(
        re.escape(f".{base[:_NAME_KEEP]}.") + r"([0-9a-f]{8})-([0-9]+)-[0-9a-f]{12}\.tmp"
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


def _sweep(folder: str, base: str) -> None:
    """Remove temporary files of earlier saves to ``base`` that were left behind by a killed
    process: written on this host by a process that no longer exists, or older than
    ``_STALE_AFTER_S`` (a writer on another host sharing the folder)."""
    pattern, host, now = _pattern(base), _host_tag(), time.time()
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = pattern.fullmatch(entry.name)
            if match is None:
                continue
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(info.st_mode):
                    continue
                dead = match.group(1) == host and not _alive(int(match.group(2)))
                if dead or now - info.st_mtime > _STALE_AFTER_S:
                    os.unlink(entry.path)


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
    token = f"{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp = os.path.join(folder, f".{base[:_NAME_KEEP]}.{token}.tmp")
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
    # Make the rename itself durable; not every platform can open a directory (Windows).
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
