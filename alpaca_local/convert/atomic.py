"""Write a file so that the target path only ever holds a complete file.

Data goes to a hidden temp file beside the target (same filesystem, so the
final rename is atomic); on success it is flushed, fsynced and renamed over
the target; on any error, Ctrl-C or SIGTERM the temp file is removed and the
target (an older file kept with --force included) is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from alpaca_local.errors import InputError, RuntimeFailure, UsageError


def check_target(target: Path, force: bool, need_bytes: int = 0) -> None:
    """Refuse early what would fail late: existing target, a directory, no room, no access."""
    if target.is_dir():
        raise UsageError(f"output {target} is a directory; give a file name ending in .gguf")
    if target.exists() and not force:
        raise UsageError(f"{target} already exists; pass --force to overwrite it, or choose another name with -o")
    parent = target.parent
    if not parent.is_dir():
        if parent.exists():
            raise UsageError(
                f"{parent} is a file, not a folder, so {target} cannot be created; choose another output with -o"
            )
        raise UsageError(f"output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        why = "read-only filesystem" if os.statvfs(parent).f_flag & os.ST_RDONLY else "permission denied"
        raise InputError(f"cannot write to {parent}: {why}; choose another output with -o")
    free = shutil.disk_usage(parent).free
    if need_bytes and free < need_bytes:
        raise RuntimeFailure(
            f"not enough disk space in {parent}: the output needs {need_bytes / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free; free some space or choose another output with -o"
        )


def check_targets(targets: Sequence[Path], force: bool, need_bytes: int) -> None:
    """check_target for every file of one run (levels, split parts), and room for all of them together."""
    for target in targets:
        check_target(target, force)
    if targets and len(set(targets)) != len(targets):
        raise UsageError(f"two outputs would both be named {targets[0].parent}/...; give distinct names")
    free = shutil.disk_usage(targets[0].parent).free if targets else 0
    if targets and need_bytes and free < need_bytes:
        raise RuntimeFailure(
            f"not enough disk space in {targets[0].parent}: the {len(targets)} outputs need "
            f"{need_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free; free some space or choose another output with -o"
        )


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the cleanup below runs."""

    def handler(signum, frame):  # noqa: ANN001
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# For other long steps that must clean up on SIGTERM too (measure/calibrate.py's temporaries).
sigterm_as_interrupt = _sigterm_as_interrupt

_WRITE_ERRNOS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this filesystem",
    errno.EIO: "input/output error",
}


def _final_mode(target: Path) -> int:
    """The permissions a plain open() would give: the old file's with --force, else 0o666 & ~umask.

    mkstemp makes its file 0600, and the rename keeps that: without this a converted
    model would be unreadable to other users (an Ollama or llama.cpp server account).
    """
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        pass
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; it becomes `target` only if the block finishes."""
    with atomic_write_all([target]) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_write_all(targets: Sequence[Path]) -> Iterator[list[Path]]:
    """Yield a temp path beside each target; all become their targets only if the block finishes.

    Every file is fsynced before the first rename, so after an error, Ctrl-C or SIGTERM
    inside the block no target changed, and after success every target is complete
    (`convert --quant a,b,...` writes all its levels and parts this way).
    """
    temps: list[Path] = []
    done = False
    try:
        for target in targets:
            try:
                fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
            except OSError as exc:
                raise InputError(
                    f"cannot create a file in {target.parent}: {exc.strerror}; choose another output with -o") from exc
            os.close(fd)
            temps.append(Path(tmp_name))
        with _sigterm_as_interrupt():
            try:
                yield list(temps)
                for tmp in temps:
                    fd = os.open(tmp, os.O_RDONLY)
                    try:
                        os.fsync(fd)  # the data is on disk before the name points to it
                    finally:
                        os.close(fd)
            except OSError as exc:
                if exc.errno not in _WRITE_ERRNOS:
                    raise
                what = targets[0] if len(targets) == 1 else f"{len(targets)} files in {targets[0].parent}"
                raise RuntimeFailure(
                    f"{_WRITE_ERRNOS[exc.errno]} while writing {what}; nothing was written"
                    " (free some space or choose another output with -o)"
                ) from exc
            for tmp, target in zip(temps, targets):
                os.chmod(tmp, _final_mode(target))
            for tmp, target in zip(temps, targets):
                os.replace(tmp, target)
            done = True
    finally:
        if not done:
            for tmp in temps:
                with contextlib.suppress(OSError):
                    tmp.unlink()
