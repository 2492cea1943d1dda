"""The OpenBLAS route on Linux: active by default, reported, and cleanly off when asked."""

import os
import subprocess
import sys

import pytest

CHECK = "import mlxft, mlxft.cpu.blas as b; print(b.status())"


def run(env_extra, code=CHECK):
    env = {**os.environ, **env_extra}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-only route")
def test_openblas_active_and_reported():
    out = run({})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OpenBLAS"), out.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-only route")
def test_kernels_are_named_and_a_forced_core_type_is_said():
    """Which kernels OpenBLAS runs decides its speed (AVX2 vs AVX-512: 2x on a Zen 5)."""
    out = run({"OPENBLAS_CORETYPE": "Haswell"})
    assert "Haswell kernels (set by OPENBLAS_CORETYPE)" in out.stdout, out.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-only route")
def test_opt_out_and_too_late_are_reported():
    assert "reference BLAS (MLXFT_BLAS=reference)" in run({"MLXFT_BLAS": "reference"}).stdout
    late = run({}, "import mlx.core, mlxft, mlxft.cpu.blas as b; print(b.status())")
    assert "mlx.core was imported before mlxft" in late.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-only route")
def test_openblas_gives_same_matmul():
    code = (
        "import mlxft, mlx.core as mx, numpy as np; mx.random.seed(0); a = mx.random.normal((64, "
        "48)); "
        "b = mx.random.normal((48, 32)); print(float(np.abs(np.array(a @ b) - np.array(a) @ "
        "np.array(b)).max()))"
    )
    assert float(run({}, code).stdout) < 1e-4


def test_info_command_names_blas():
    out = subprocess.run(
        [sys.executable, "-m", "mlxft", "info"], capture_output=True, text=True, timeout=120
    )
    assert "BLAS:" in out.stdout, out.stdout + out.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-only route")
def test_openblas_waits_for_mlx_and_stays_out_of_torch_processes():
    # libtorch exports sgemm_ & co.: a process-wide OpenBLAS would take over torch's matmuls
    code = (
        "import mlxft, mlxft.cpu.blas as b, torch, ctypes; print(b._STATE['name']); "
        "import mlx.core; print(b._STATE['name'])"
    )
    out = run({}, code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "OpenBLAS"], out.stdout


# ---------------------------------------------------------------------------- the link directory
@pytest.fixture
def shim_env(monkeypatch, tmp_path):
    """_shim_dir with stand-in library paths, a private cache home and temp directory."""
    from mlxft.cpu import blas

    monkeypatch.setattr(blas, "_mlx_bundled", lambda prefix: f"/opt/mlx_cpu.libs/{prefix}.so")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(blas.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    return blas, tmp_path / "cache" / "mlxft", tmp_path / "tmp" / f"mlxft-{os.getuid()}"


def mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_link_directory_is_private(shim_env):
    blas, cache, _ = shim_env
    folder = blas._shim_dir("/opt/openblas/libopenblas.so")
    assert folder.parent == cache and mode(cache) == 0o700
    assert os.readlink(folder / "libopenblas.so.0") == "/opt/openblas/libopenblas.so"
    assert os.readlink(folder / "libgfortran.so.5") == "/opt/mlx_cpu.libs/libgfortran.so"
    assert blas._shim_dir("/opt/openblas/libopenblas.so") == folder  # reused as it is


def test_a_directory_others_can_write_is_refused(shim_env):
    blas, cache, fallback = shim_env
    cache.mkdir(parents=True)
    os.chmod(cache, 0o777)
    folder = blas._shim_dir("/opt/openblas/libopenblas.so")
    assert folder.parent == fallback and mode(fallback) == 0o700


def test_a_planted_link_directory_is_refused(shim_env):
    blas, cache, fallback = shim_env
    folder = blas._shim_dir("/opt/openblas/libopenblas.so")
    (folder / "libopenblas.so.0").unlink()
    os.symlink("/tmp/evil/libopenblas.so", folder / "libopenblas.so.0")
    again = blas._shim_dir("/opt/openblas/libopenblas.so")
    assert again.parent == fallback
    assert os.readlink(again / "libopenblas.so.0") == "/opt/openblas/libopenblas.so"


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="chown needs root")
def test_directories_owned_by_someone_else_are_refused(shim_env):
    blas, cache, fallback = shim_env
    for folder in (cache, fallback):
        folder.mkdir(parents=True)
        os.chmod(folder, 0o700)
        os.chown(folder, 4242, 4242)
    with pytest.raises(OSError, match="belongs to uid 4242, not to this user: refused"):
        blas._shim_dir("/opt/openblas/libopenblas.so")
    assert not any(cache.iterdir()) and not any(fallback.iterdir())
