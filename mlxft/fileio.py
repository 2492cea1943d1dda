"""Crash-safe writes: every file or directory appears complete or not at all.

Written to a temporary name in the same directory, flushed, then renamed (rename is atomic
within a filesystem), so a kill at any moment leaves the previous version or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
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


@contextlib.contextmanager
def atomic_dir(path: Path, overwrite: bool = True):
    """Yield a temporary directory; on success it becomes `path` (replacing an old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        _fsync_dir(tmp)
        if path.exists():
            if not overwrite:
                raise FileExistsError(path)
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(path: Path, what: str = "adapter_path") -> None:
    """Fail before any work when an output directory cannot be created or written."""
    from mlxft.errors import UserError

    path = Path(path)
    probe_root = path
    while not probe_root.exists():
        probe_root = probe_root.parent
    if probe_root != path and not probe_root.is_dir():
        raise UserError(f"{what}: {path} cannot be created ({probe_root} is a file)")
    if path.exists() and not path.is_dir():
        raise UserError(f"{what}: {path} is a file, not a directory; choose another {what}")
    if not os.access(probe_root, os.W_OK | os.X_OK):
        raise UserError(f"{what}: {probe_root} is not writable; choose another {what}")
