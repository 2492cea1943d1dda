"""A write that fails — full disk (ENOSPC), file-size limit (EFBIG), read-only (EROFS) or
forbidden (EACCES) destination — is one `Error:` line naming the path, the reason and what to
do, exit status 2, with every file written before intact and no temporary left behind: for
`lora` (checkpoints, adapter), `fuse`, `import` and `convert`.

The full and read-only disks are real: a small tmpfs mounted for the test (skipped where
mounting is not permitted, i.e. without root).  The file-size limit is real too
(`RLIMIT_FSIZE` in a subprocess; Python ignores SIGXFSZ, so the write returns EFBIG).  EACCES
(root writes anywhere) and the unprivileged fallback for ENOSPC are simulated by making the
writer's own os-level call fail.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxft.cli import main
from mlxft.errors import UserError
from tests.conftest import STORIES, write_wikisql

FILLER = "filler.bin"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != FILLER
    }


def temporaries(folder: Path) -> list:
    return [p for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def mount(point: Path, options: str) -> None:
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
        capture_output=True,
        text=True,
    )
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'})")


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MB tmpfs of our own (unmounted afterwards)."""
    point = tmp_path / "fs"
    point.mkdir()
    mount(point, "size=4m")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False)


def fill(fs: Path, leave: int) -> None:
    """Use up the filesystem but `leave` bytes."""
    stat = os.statvfs(fs)
    free = stat.f_bavail * stat.f_frsize
    with open(fs / FILLER, "ab") as handle:
        handle.write(b"\0" * max(free - leave, 0))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_wikisql(tmp_path_factory.mktemp("write_errors_data"), 12, 4)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    result = cli(*train_args(STORIES, data, out, "3"))
    assert result.exit_code == 0, result.output
    return out


def train_args(model, data, out, iters, *extra):
    return [
        "lora",
        "--train",
        "--model",
        model,
        "--data",
        data,
        "--adapter-path",
        out,
        "--iters",
        iters,
        "--batch-size",
        "2",
        "--max-seq-length",
        "64",
        "--val-batches",
        "1",
        "--save-every",
        "2",
        *extra,
    ]


# ---------------------------------------------------------------------------- full disk
def test_full_disk_while_training_keeps_the_earlier_checkpoint(small_fs, stories, data):
    run = small_fs / "run"
    first = cli(*train_args(stories, data, run, "3"))
    assert first.exit_code == 0, first.output
    before = snapshot(run / "checkpoints")
    adapter = (run / "adapter_model.safetensors").read_bytes()
    fill(small_fs, 48 * 1024)  # room for the config and metrics, not for a checkpoint
    line = one_error_line(cli(*train_args(stories, data, run, "6", "--resume")))
    assert "cannot write (No space left on device, ENOSPC); the disk is full" in line, line
    assert "Files written before are unchanged" in line
    assert str(run) in line
    assert snapshot(run / "checkpoints") == before  # checkpoint step-2 intact
    assert (run / "adapter_model.safetensors").read_bytes() == adapter
    assert not temporaries(run) and not (run / ".mlxft.lock").exists()


@pytest.mark.parametrize("command", ["fuse", "import", "convert"])
def test_full_disk_for_an_output_directory(command, small_fs, adapter):
    kept = small_fs / "earlier"
    shutil.copytree(adapter, kept, ignore=shutil.ignore_patterns("checkpoints"))
    before = snapshot(small_fs)
    fill(small_fs, 16 * 1024)
    out = small_fs / "out"
    args = {
        "fuse": ["fuse", "--model", STORIES, "--adapter-path", adapter, "--save-path", out],
        "import": ["import", adapter, "--save-path", out],
        "convert": ["convert", "--hf-path", STORIES, "--mlx-path", out],
    }[command]
    line = one_error_line(cli(*args))
    assert "(No space left on device, ENOSPC); the disk is full" in line, line
    assert not out.exists() and not temporaries(small_fs)
    assert snapshot(small_fs) == before


# ---------------------------------------------------------------------------- read-only
@pytest.mark.parametrize("command", ["lora", "fuse", "import", "convert"])
def test_read_only_destination(command, small_fs, stories, data, adapter):
    earlier = small_fs / "run"
    shutil.copytree(adapter, earlier)
    before = snapshot(small_fs)
    remount = subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], capture_output=True)
    if remount.returncode:
        pytest.skip("cannot remount the tmpfs read-only")
    out = small_fs / "out"
    args = {
        "lora": train_args(stories, data, earlier, "3"),
        "fuse": ["fuse", "--model", stories, "--adapter-path", adapter, "--save-path", out],
        "import": ["import", adapter, "--save-path", out],
        "convert": ["convert", "--hf-path", stories, "--mlx-path", out],
    }[command]
    line = one_error_line(cli(*args))
    assert f"{small_fs if command != 'lora' else earlier} is not writable" in line, line
    assert snapshot(small_fs) == before


# ---------------------------------------------------------------------------- file-size limit
def run_limited(args, limit: int, cwd: Path) -> subprocess.CompletedProcess:
    """mlxft in a subprocess whose files may not grow past `limit` bytes."""

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "mlxft", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        preexec_fn=limited,
        timeout=600,
    )


def test_file_size_limit_while_training_and_importing(stories, data, adapter, tmp_path):
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    limit = adapter_bytes // 2  # config and metrics fit; adapter weights and checkpoints do not
    run = tmp_path / "run"
    result = run_limited(train_args(stories, data, run, "3"), limit, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "(File too large, EFBIG); the file exceeds the size" in lines[0]
    assert not temporaries(run) and not list(run.glob("checkpoints/step-*"))
    assert not (run / "adapter_model.safetensors").exists()
    result = run_limited(["import", adapter, "--save-path", tmp_path / "imported"], limit, tmp_path)
    assert result.returncode == 2 and "EFBIG" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "imported").exists()


# ---------------------------------------------------------------------------- simulated
def test_simulated_failures_are_one_line_and_keep_the_old_file(tmp_path, monkeypatch):
    """Where no filesystem can be mounted: the writer's own calls fail as a full disk (fsync)
    or a forbidden directory (mkstemp) would make them."""
    from mlxft import fileio

    path = tmp_path / "config.yaml"
    path.write_text("old\n")
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(UserError, match=r"config.yaml: cannot write \(.*ENOSPC\); the disk is"):
        fileio.write_text(path, "new\n")
    monkeypatch.setattr(fileio.os, "fsync", real_fsync)

    def forbidden(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(fileio.tempfile, "mkstemp", forbidden)
    with pytest.raises(UserError, match=r"EACCES\); permission denied: choose a path you can"):
        fileio.write_text(path, "new\n")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_safetensors_io_errors_are_read_for_their_errno():
    from safetensors import SafetensorError

    from mlxft.fileio import os_errno, write_error

    err = SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    assert os_errno(err) == errno.EFBIG
    assert "EFBIG" in str(write_error(err, Path("m/model.safetensors")))
