"""One job per output folder: a lock file holding the owner's pid, held with `flock` for the job's life.

The kernel drops an `flock` when its holder dies, however it dies (`kill -9` too), so a lock that can
be taken while the file still names another pid was left by a dead job: it is taken over with a
notice. A live holder makes a second job refuse in one line, before it loads anything.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket

from .files import DamagedFileError

LOCK_NAME = ".loraforge.lock"


class OutputFolderBusy(DamagedFileError):
    """Another live job writes to this output folder."""


@contextlib.contextmanager
def hold(output_dir: str, announce=print):
    """Hold the output folder's lock for the duration of the `with` block.

    Args:
        output_dir: the job's output folder (created if missing).
        announce: where the stale-lock notice goes.

    Raises:
        OutputFolderBusy: another live process holds the lock.
    """
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate only the first rank guards the folder
        yield
        return
    created = not os.path.isdir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            raise OutputFolderBusy(
                f"training.output_dir: {output_dir} is in use by another job ({owner}); wait for it to finish or "
                "give this job another output_dir") from None
        previous = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        if previous:
            announce(f"loraforge train: taking over the lock of a job that is no longer running ({previous}) in "
                     f"{output_dir}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            with contextlib.suppress(OSError):
                os.remove(path)
    finally:
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(output_dir)  # a job refused before it wrote anything leaves no empty folder behind
