"""The layout keeps its promises: no import cycles (imports inside functions count), commands
never import the CLI module, libraries never import commands, and a torch run — full
fine-tune saved included — never imports MLX."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

# repository folder -> the import package it installs as (pyproject's package-dir)
PACKAGES = {"mlxft": "mlxft", "convert": "mlxft.convert", "torch_backend": "mlxft.torch_backend"}


def modules() -> dict:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def import_graph() -> dict:
    """module -> the project modules it imports, anywhere in its body."""
    mods = modules()
    edges = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def cycles(edges: dict) -> list:
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_commands_never_import_the_cli_and_libraries_never_import_commands():
    edges = import_graph()
    for name, targets in edges.items():
        if name.startswith("mlxft.commands"):
            assert "mlxft.cli" not in targets, f"{name} imports mlxft.cli"
        elif name not in ("mlxft.cli", "mlxft.__main__"):
            assert not any(t.startswith("mlxft.commands") for t in targets), (
                f"{name} imports a command"
            )


def test_the_neutral_layers_import_no_tensor_framework():
    """Data, adapters, training and inference hold no tensor code: a backend does."""
    neutral = ("mlxft.data", "mlxft.adapters", "mlxft.training", "mlxft.inference")
    for name, path in modules().items():
        if name.startswith(neutral):
            tree = ast.parse(path.read_text())
            roots = {
                (a.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
                for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for a in (node.names if isinstance(node, ast.Import) else [node])
            }
            assert not roots & {"mlx", "mlx_lm", "torch"}, (
                f"{name} imports {roots & {'mlx', 'torch'}}"
            )


@pytest.mark.slow
def test_torch_full_fine_tune_never_imports_mlx(tiny_llama, wikisql_small, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "full"
    code = (
        "import sys\n"
        "from mlxft.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:], standalone_mode=False)\n"
        "finally:\n"
        "    loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm'))\n"
        "    print('MLX-MODULES', __import__('json').dumps(loaded))\n"
    )
    args = [
        "lora",
        "--train",
        "--backend",
        "torch",
        "--device",
        "cpu",
        "--fine-tune-type",
        "full",
        "--model",
        str(tiny_llama),
        "--data",
        str(wikisql_small),
        "--adapter-path",
        str(out),
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--max-seq-length",
        "64",
        "--num-layers",
        "-1",
        "--val-batches",
        "1",
        "--save-every",
        "1",
    ]
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "checkpoints" / "step-0000001" / "model.safetensors").is_file()
    line = next(x for x in result.stdout.splitlines() if x.startswith("MLX-MODULES"))
    assert json.loads(line.split(" ", 1)[1]) == []


def test_every_package_is_in_the_wheel_list():
    """pyproject lists packages explicitly (three folders map into `mlxft`): a new sub-package
    must be added there, or the wheel silently lacks it."""
    tomllib = pytest.importorskip("tomllib")

    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert on_disk - listed == set()


def test_both_backends_have_every_protocol_method_with_its_parameters():
    """`mlxft.backend.Backend` is the whole contract: a method added there (e.g. the batched
    generation of `mlxft evaluate`) must exist in both backends under the same parameter names."""
    import inspect

    pytest.importorskip("torch")
    from mlxft.backend import Backend
    from mlxft.mlx_backend import MLXBackend
    from mlxft.torch_backend import TorchBackend

    methods = {
        name: list(inspect.signature(member).parameters)
        for name, member in vars(Backend).items()
        if not name.startswith("_") and inspect.isfunction(member)
    }
    assert {"start_batch_generation", "next_batch_logits", "end_generation"} <= set(methods)
    for cls in (MLXBackend, TorchBackend):
        for name, params in methods.items():
            assert hasattr(cls, name), f"{cls.__name__} lacks {name}"
            assert list(inspect.signature(getattr(cls, name)).parameters) == params, (
                f"{cls.__name__}.{name}"
            )
