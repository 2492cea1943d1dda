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
