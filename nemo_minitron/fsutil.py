"""Atomic outputs: a result is either complete or absent, never half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from nemo_minitron.errors import UserError


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to fill; on success it is renamed to ``target``.

    On any exception the temporary directory is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} already exists")
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def create_once(target: Path, ready: Callable[[Path], bool], create: Callable[[Path], None]) -> Path:
    """``target``, made by ``create(target)`` unless ``ready(target)``, under an exclusive lock beside it: of the
    processes that need it at the same time (jobs or test workers sharing a cache), one makes it and the others
    wait, then use it."""
    import fcntl

    target = Path(target)
    if ready(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when its holder dies
        if not ready(target):
            create(target)
    return target


def remove_leftovers(target: Path) -> None:
    """Remove what a process killed inside :func:`atomic_directory` for ``target`` left beside it."""
    target = Path(target)
    if target.parent.is_dir():
        for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
            for stale in target.parent.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: a crash leaves the old content or the new, never a part."""
    path = Path(path)
    part = path.with_name(f".{path.name}.part")
    with open(part, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def check_can_create(path: str | Path, key: str, directory: bool) -> None:
    """One-line error, before any work, when the output ``path`` (a ``directory`` or a file) cannot be
    written: it exists as the other kind, something on its way is a file, or that folder is not writable."""
    path = Path(path).expanduser().absolute()
    if path.exists() and path.is_dir() != directory:
        raise UserError(f"{key}: {path} exists and is {'not ' if directory else ''}a directory")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{key}: cannot create {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{key}: cannot create {path}: {folder} is not writable")


@contextlib.contextmanager
def atomic_file(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path of the file ``target`` to write; on success it is renamed to ``target``.

    On any exception the temporary file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} already exists")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


class DirectoryLock:
    """One live process at a time in a run directory: ``<directory>/.lock``, held with ``flock``.

    The kernel drops the lock when its holder exits, killed or not, so a dead holder never keeps it; the file
    names the holder (``pid`` on ``host``) for the message of whoever is refused. Used as a context manager.
    """

    FILE = ".lock"

    def __init__(self, directory: str | Path, what: str) -> None:
        self.path = Path(directory) / self.FILE
        self.what = what
        self.fd: int | None = None

    def __enter__(self) -> "DirectoryLock":
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.what} {self.path.parent} is in use by {holder}: wait for it to finish, "
                            "or stop it, or choose another output") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *_exc) -> None:
        import fcntl

        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
