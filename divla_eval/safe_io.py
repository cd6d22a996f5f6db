"""Writing output files so that a full disk, a read-only folder or a kill never leaves a torn file.

Every file a command writes for the user (reports, tables, plots, bench results) goes through
`atomic_output`: the content is written to a temporary file in the destination's own directory, flushed
to disk, then renamed over the destination. A rename within one directory is atomic, so a reader sees
either the previous complete file or the new complete one, never half of one (a plot cut short by a
full disk used to be left as a 0-byte PNG that looked like a result). When writing fails, the
temporary file is removed and the error is one `OutputError` line naming the file and the reason, and
saying that the previous version (if any) is untouched.

The path checks here tell "does not exist" apart from "is a file, not a directory": the two need
different fixes, and reporting a file given where a directory is expected as missing sent users
looking for a typo that was not there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from divla_eval.errors import DivlaEvalError

_UMASK = os.umask(0)  # the only way to read it is to set it: once, at import
os.umask(_UMASK)


class OutputError(DivlaEvalError):
    """An output file or directory cannot be written (read-only, full disk, a file in the way...)."""


def reason(exc: OSError) -> str:
    """The OS's words for a failed file operation, plus a hint for the causes users can fix."""
    text = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        text += " (free some space and rerun)"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        text += " (choose a writable location)"
    return text


def check_out_text(text: str, flag: str = "--out") -> Path:
    """A path given on the command line; an empty one is refused rather than read as the current
    directory (`Path('')` is `.`), which scattered a run's files among the user's own."""
    if not text.strip():
        raise OutputError(f"{flag} is empty: give a path")
    return Path(text)


def require_dir(path: Path, what: str) -> Path:
    """`path` as an existing directory, or one line saying whether it is missing or a file."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.exists():
        raise DivlaEvalError(f"{what} {path} is a file, not a directory")
    raise DivlaEvalError(f"{what} {path} does not exist")


def ensure_dir(path: Path, what: str = "output directory") -> Path:
    """Create `path` (and its parents) if needed, or one line saying why it cannot be a directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a directory")
    for parent in path.parents:  # a file where a parent directory should be
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"cannot create {what} {path}: {parent} is a file, not a directory")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {what} {path}: {reason(exc)}") from None
    return path


def check_writable_dir(path: Path, what: str = "output directory") -> Path:
    """`ensure_dir` plus a probe file: fail before hours of work, not after, on a read-only folder."""
    ensure_dir(path, what)
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".divla-eval-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to {what} {path}: {reason(exc)}") from None
    return path


def check_output_file(path: Path, what: str = "output file") -> Path:
    """An output file path whose directory can be made and which is not itself a directory."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a directory; give a file path")
    check_writable_dir(path.parent, f"the directory of {what}")
    return path


@contextlib.contextmanager
def atomic_output(path: Path, what: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error, make it `path`.

    Write the content to the yielded path (any writer that takes a file name: matplotlib, pandas,
    h5py...). On success it is fsynced and renamed over `path`; on any error it is removed and `path`
    keeps its previous content. OSErrors become one `OutputError` line."""
    path = Path(path)
    what = what or str(path)
    if path.is_dir():
        raise OutputError(f"cannot write {what}: {path} is a directory")
    ensure_dir(path.parent, f"the directory of {path.name}")
    kept = "; the previous version is kept" if path.exists() else ""
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"cannot write {what}: {reason(exc)}{kept}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the data must be on disk before the name points at it
            os.fsync(f.fileno())
        if tmp.stat().st_size == 0 and path.suffix.lower() in (".png", ".pdf", ".svg"):
            raise OSError(errno.EIO, "the writer produced an empty file")
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; an output file is meant to be shared
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {what}: {reason(exc)}{kept}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str, what: str | None = None) -> Path:
    """Write a text file atomically (see `atomic_output`)."""
    with atomic_output(path, what) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_figure(fig, path: Path, what: str | None = None, **kwargs) -> Path:
    """`fig.savefig` atomically; the format comes from `path`'s suffix, not the temporary name's."""
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
    with atomic_output(path, what) as tmp:
        fig.savefig(tmp, **kwargs)
    return path
