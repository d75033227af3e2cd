"""Output files: temporary siblings named after the writing process, the user's umask, and
stale temporary files of killed writers cleaned up by the next writer of the same file.

A temporary file is ``.NAME.PID.XXXXXXXX.tmp`` beside ``NAME``; one whose process no longer
runs (a run killed with SIGKILL, a power cut) is removed the next time ``NAME`` is written.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

# temporary files without a process id (written by older versions) count as stale after this
_OLD_TEMP_S = 3600.0


def current_umask() -> int:
    """The process's umask (read from /proc where possible: setting it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove ``.NAME.*.tmp`` files beside ``path`` left by writers that no longer run.
    Returns the files removed."""
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for e in entries:
        if not (e.name.startswith(prefix) and e.name.endswith(".tmp")):
            continue
        rest = e.name[len(prefix):-len(".tmp")]
        ours = re.fullmatch(r"(\d+)\.[a-z0-9_]{8}", rest)  # PID.XXXXXXXX (mkstemp's 8 characters)
        if ours is None and not re.fullmatch(r"[a-z0-9_]{8}", rest):
            continue  # another file's
        try:
            if ours is not None:
                stale = not _alive(int(ours.group(1)))
            else:
                stale = time.time() - e.stat(follow_symlinks=False).st_mtime > _OLD_TEMP_S
            if stale and e.is_file(follow_symlinks=False):
                os.unlink(e.path)
                removed.append(Path(e.path))
        except OSError:
            continue
    return removed


def make_temp(path: str | os.PathLike) -> tuple[int, str]:
    """A new temporary file beside ``path`` (stale ones removed first), open for writing, with
    the permissions a newly created file gets from the umask (not mkstemp's 0600).
    Returns ``(fd, name)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except OSError:
        pass
    return fd, tmp


def check_writable(path: str | os.PathLike) -> None:
    """Raise ``OSError`` unless a file can be written at ``path`` (its folder is made if
    missing): a temporary file is created beside it and removed."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "is a folder", str(path))
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(13, "Permission denied", str(path))
    fd, tmp = make_temp(path)
    os.close(fd)
    os.unlink(tmp)
