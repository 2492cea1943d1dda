"""Give MLX an optimized BLAS on Linux before `mlx.core` is first imported.

Why: the Linux `mlx[cpu]` wheel links a netlib *reference* BLAS, an order of magnitude slower
than an optimized one (benchmarks/RESULTS.md).  MLX resolves `cblas_sgemm` through the dynamic
linker, so an OpenBLAS loaded process-wide (RTLD_GLOBAL) before `libmlx.so` takes over every
matmul.

The OpenBLAS comes from the `ngsolve-openblas` wheel (plain `cblas_*` symbols, BSD-3).  Its
only system dependency is `libgfortran.so.5`, which many machines lack; the `mlx[cpu]` wheel
already bundles one under a mangled name.  When the system has none we make a private
directory of symlinks (OpenBLAS + `libgfortran.so.5` -> MLX's copy) and load OpenBLAS from
there: its RPATH is `$ORIGIN`, so the dynamic linker finds the sibling link.  No re-exec,
no LD_PRELOAD, nothing written outside the user's cache directory.

Never on macOS: MLX uses Accelerate/Metal there.  `MLXFT_BLAS=reference` turns this off
(for before/after measurements).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import importlib.util
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from mlxft.flags import blas_reference

_STATE: dict = {"name": None, "detail": "", "path": None}


def status() -> str:
    """One line naming the BLAS behind MLX's CPU matmuls."""
    if _STATE["name"] is None:
        ensure()
    return _STATE["name"] + (f" ({_STATE['detail']})" if _STATE["detail"] else "")


def _site_file(package: str, pattern: str) -> str | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        hits = sorted(glob.glob(os.path.join(location, pattern)))
        if hits:
            return hits[-1]
    return None


def _openblas_candidates() -> list[str]:
    found = []
    lib = _site_file("ngsolve_openblas", "libopenblas*.so*")
    if lib:
        found.append(lib)
    cmeel = _site_file("cmeel", "../cmeel.prefix/lib/libopenblas.so.0")
    if cmeel:
        found.append(os.path.normpath(cmeel))
    return found


def _mlx_bundled(prefix: str) -> str | None:
    """A shared library that the mlx-cpu wheel bundles in `mlx_cpu.libs/` (auditwheel names)."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        hits = sorted(glob.glob(os.path.join(location, "..", "mlx_cpu.libs", prefix + "*")))
        if hits:
            return os.path.normpath(hits[0])
    return None


def _private_dir(path: Path) -> Path:
    """`path` as a directory no one else can plant a library in: created with mode 0700; an
    existing one must be a real directory (no symlink), owned by this user and not writable by
    group or others, or it is refused (OSError)."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(f"{path} is not a directory: refused")
    if info.st_uid != os.getuid():
        raise OSError(f"{path} belongs to uid {info.st_uid}, not to this user: refused")
    if info.st_mode & 0o022:
        raise OSError(f"{path} is writable by other users: refused")
    return path


def _links_ok(folder: Path, links: dict) -> bool:
    """An existing link directory is used only if it is ours and each link points where ours
    would."""
    try:
        _private_dir(folder)
        return all(os.readlink(folder / name) == target for name, target in links.items())
    except OSError:
        return False


def _shim_dir(openblas: str) -> Path:
    """A directory holding symlinks: libopenblas.so.0, libgfortran.so.5 and its own deps, in
    the user's cache directory or else a per-user one under the temp directory, each checked by
    `_private_dir` (a shared /tmp is where someone else could have prepared one)."""
    gfortran = _mlx_bundled("libgfortran")
    if gfortran is None:
        raise OSError("no libgfortran.so.5 on the system and none bundled with mlx")
    links = {"libopenblas.so.0": openblas, "libgfortran.so.5": gfortran}
    for dep in ("libquadmath",):
        path = _mlx_bundled(dep)
        if path:
            links[os.path.basename(path)] = path
    key = hashlib.sha1(repr(sorted(links.items())).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlxft"
    refused = []
    for root in (cache, Path(tempfile.gettempdir()) / f"mlxft-{os.getuid()}"):
        try:
            _private_dir(root)
            final = root / f"blas-{key}"
            if final.exists() or final.is_symlink():
                if _links_ok(final, links):
                    return final
                raise OSError(f"{final} is not the link directory mlxft would make: refused")
            tmp = Path(tempfile.mkdtemp(prefix=".blas-", dir=root))
            for name, target in links.items():
                os.symlink(target, tmp / name)
            try:
                os.rename(tmp, final)  # atomic: a racing process may have won; both are fine
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
            if _links_ok(final, links):
                return final
            raise OSError(f"{final} is not the link directory mlxft would make: refused")
        except OSError as err:
            refused.append(str(err))
    raise OSError("no safe directory for the OpenBLAS links (" + "; ".join(refused) + ")")


def _load(path: str) -> ctypes.CDLL:
    return ctypes.CDLL(path, mode=os.RTLD_GLOBAL)


def _describe(lib: ctypes.CDLL) -> str:
    try:
        lib.openblas_get_config.restype = ctypes.c_char_p
        config = lib.openblas_get_config().decode().split()
        threads = lib.openblas_get_num_threads()
        lib.openblas_get_corename.restype = ctypes.c_char_p
        core = lib.openblas_get_corename().decode()
    except (AttributeError, OSError):
        return ""
    # OpenBLAS picks its kernels by CPU model unless told: a forced older core type (some machines
    # set one for old OpenBLAS builds) can halve sgemm speed, e.g. AVX2 kernels on an AVX-512 CPU
    forced = os.environ.get("OPENBLAS_CORETYPE")
    return (
        " ".join(config[:2])
        + f", {core} kernels"
        + (" (set by OPENBLAS_CORETYPE)" if forced else "")
        + f", {threads} threads"
    )


def ensure() -> str:
    """Load OpenBLAS globally if this is Linux and MLX has not been imported yet."""
    if _STATE["name"] is not None:
        return _STATE["name"]
    if sys.platform == "darwin":
        _STATE.update(name="Accelerate", detail="macOS")
        return _STATE["name"]
    if not sys.platform.startswith("linux"):
        _STATE.update(name="platform default", detail=sys.platform)
        return _STATE["name"]
    if blas_reference():
        _STATE.update(name="reference BLAS", detail="MLXFT_BLAS=reference")
        return _STATE["name"]
    if "mlx.core" in sys.modules:
        _STATE.update(name="reference BLAS", detail="mlx.core was imported before mlxft")
        return _STATE["name"]
    errors = []
    for candidate in _openblas_candidates():
        try:
            try:
                lib = _load(candidate)
            except OSError as first:
                if "libgfortran" not in str(first):
                    raise
                lib = _load(str(_shim_dir(candidate) / "libopenblas.so.0"))
            _STATE.update(name="OpenBLAS", detail=_describe(lib), path=candidate)
            return _STATE["name"]
        except OSError as err:
            errors.append(f"{os.path.basename(candidate)}: {err}")
    reason = "; ".join(errors) or "pip install ngsolve-openblas for much faster CPU matmuls"
    _STATE.update(name="reference BLAS", detail=reason)
    return _STATE["name"]
