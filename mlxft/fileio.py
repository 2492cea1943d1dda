"""Crash-safe writes: every file or directory appears complete or not at all.

Everything mlxft writes goes through here.  A file or directory is written under a temporary
name in its destination's own directory (`.<name>.tmp-<random>`), flushed, then renamed:
rename is atomic within a filesystem, so a kill at any moment leaves the previous version or
the new one, never a mix.  Destinations are checked before any slow work starts.

A write that fails (full disk, file-size limit, read-only or forbidden destination) is one
`UserError` naming the path and what to do (`write_error`); the temporary is removed and the
previous version of the file stays as it was.  What a killed process leaves behind is
recognised by name (`temp_leftover`) and swept at the next start (`mlxft.training.run_dir`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mlxft.errors import UserError

# errno -> what to do about it, for a write that failed
_WRITE_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or choose another path",
    errno.EDQUOT: "the disk quota is used up: free some space or choose another path",
    errno.EFBIG: "the file exceeds the size this process or filesystem allows (ulimit -f): "
    "raise the limit or choose another filesystem",
    errno.EROFS: "the filesystem is read-only: choose another path",
    errno.EACCES: "permission denied: choose a path you can write to",
    errno.EPERM: "operation not permitted: choose a path you can write to",
    errno.EIO: "the device reported an I/O error: check the disk",
}
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")
_LEFTOVER = re.compile(r"^\..+\.(tmp|old)-[A-Za-z0-9_]+$")


def temp_prefix(path: Path) -> str:
    """The name prefix of `path`'s temporary files and directories (`.<name>.tmp-`)."""
    return f".{Path(path).name}.tmp-"


def temp_leftover(name: str) -> bool:
    """Whether `name` is one of our temporaries (`.<name>.tmp-XXXX`, `.<name>.old-XXXX`)."""
    return bool(_LEFTOVER.match(name))


def os_errno(err: BaseException) -> int | None:
    """The errno of a failed write: an OSError's own, or the `(os error N)` that safetensors'
    Rust writer puts in its message."""
    if isinstance(err, OSError):
        return err.errno
    match = _OS_ERROR_IN_TEXT.search(str(err)) if type(err).__name__ == "SafetensorError" else None
    return int(match.group(1)) if match else None


def write_error(err: BaseException, path: Path) -> UserError:
    """One line for a failed write of `path`: what failed, why, what to do."""
    code = os_errno(err)
    name = errno.errorcode.get(code, "error") if code else type(err).__name__
    reason = os.strerror(code) if code else str(err).splitlines()[0]
    where = getattr(err, "filename", None) or path
    advice = _WRITE_ADVICE.get(code, "check the destination")
    return UserError(
        f"{where}: cannot write ({reason}, {name}); {advice}. Files written before are unchanged"
    )


def is_write_failure(err: BaseException) -> bool:
    """An OSError (or safetensors I/O error) that a destination caused, not a bug."""
    return os_errno(err) in _WRITE_ADVICE


def ensure_dir(path: Path) -> Path:
    """mkdir -p, a failure being one line (`write_error`)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(err, path) from None
    return Path(path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb"):
    """Yield a temporary file object; on success it replaces `path`."""
    path = Path(path)
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    except OSError as err:
        raise write_error(err, path) from None
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if is_write_failure(err):
            raise write_error(err, path) from None
        raise


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (`.<name>.tmp-<random>`) for a writer that opens
    its file by name (the GGUF writer, llama.cpp's quantizer); on success it replaces `path`,
    on error it is removed.  Files the writer derives from it (`<tmp>.staging`) are its own to
    remove."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as handle:  # the writer closed it; make its bytes durable
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_file(path, "w") as handle:
        handle.write(text)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def save_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """numpy arrays -> safetensors, atomically."""
    from safetensors.numpy import save

    blob = save({k: v for k, v in sorted(tensors.items())}, metadata=metadata)
    with atomic_file(path) as handle:
        handle.write(blob)


def check_destination(path: Path, what: str = "output directory", empty: bool = True) -> None:
    """Fail before any work when `path` cannot become a directory we write: it is a file, its
    nearest existing parent is not writable, or (`empty`) it already holds something, which a
    conversion or export must never replace by accident."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what}: {path} is a file, not a directory; choose another path")
    root = path
    while not root.exists():
        root = root.parent
    if root != path and not root.is_dir():
        raise UserError(f"{what}: {path} cannot be created ({root} is a file)")
    if not os.access(root, os.W_OK | os.X_OK):
        raise UserError(f"{what}: {root} is not writable; choose another path")
    if empty and path.is_dir() and any(path.iterdir()):
        raise UserError(
            f"{what}: {path} already exists and is not empty; remove it or choose another path"
        )


@contextlib.contextmanager
def atomic_dir(path: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it becomes `path`.

    `replace` swaps out an existing `path` (checkpoints); otherwise a non-empty `path` is
    refused before and again after the work (someone may have written there meanwhile)."""
    path = Path(path).expanduser().absolute()
    if not replace:
        check_destination(path)
    ensure_dir(path.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
    except OSError as err:
        raise write_error(err, path) from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        _fsync_dir(tmp)
        if not replace:
            check_destination(path)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:  # put the previous version back
                os.replace(old / path.name, path)
                shutil.rmtree(old, ignore_errors=True)
            raise
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_failure(err):
            raise write_error(err, path) from None
        raise
