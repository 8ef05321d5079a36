"""Which sessions a running process has open, so that `sessions rm` can refuse to pull one from under it.

One lock file per open session, `$STREAMCHAT_HOME/.locks/<session id>.lock`, held with flock: the
operating system drops the lock when the process ends, so a crashed app leaves no stale lock behind.
Where flock does not exist (Windows) nothing is locked and nothing is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None


def _path(session_id: str) -> Path:
    from .store import home

    return home() / ".locks" / f"{session_id}.lock"


class Held:
    """An open session's lock; `release` (or the process ending) lets it go."""

    def __init__(self, fd: int | None, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def hold(session_id: str) -> Held:
    """Mark the session as open by this process (another process holding it is not an error here)."""
    path = _path(session_id)
    if fcntl is None:
        return Held(None, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return Held(None, path)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return Held(fd, path)


def holder(session_id: str) -> int | None:
    """The id of the process that has the session open, or None when no process has."""
    path = _path(session_id)
    if fcntl is None or not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
