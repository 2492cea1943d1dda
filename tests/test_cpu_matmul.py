"""Frozen float32 linears on oneDNN (mlxft.torch_backend.cpu_matmul): same numbers as torch's own
linear, forward and input gradient, and the same training run either way."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mlxft.data import epoch_batches  # noqa: E402
from mlxft.torch_backend import cpu_matmul  # noqa: E402
from mlxft.torch_backend.cpu_matmul import OneDNNLinear, choose  # noqa: E402
from mlxft.torch_backend.lora import LoRALinear  # noqa: E402
from mlxft.training.session import Session  # noqa: E402
from tests.session_helpers import make_config  # noqa: E402

needs_onednn = pytest.mark.skipif(
    cpu_matmul._pointwise() is None, reason="torch built without oneDNN"
)


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_frozen_linear_matches_torch_forward_and_input_gradient(bias):
    torch.manual_seed(0)
    plain = torch.nn.Linear(96, 160, bias=bias).requires_grad_(False)
    ours = torch.nn.Linear(96, 160, bias=bias).requires_grad_(False)
    ours.load_state_dict(plain.state_dict())
    ours.__class__ = OneDNNLinear
    x = torch.randn(3, 17, 96)
    outs, grads = [], []
    for module in (plain, ours):
        xi = x.clone().requires_grad_()
        y = module(xi)
        (y * torch.linspace(-1, 1, 160)).sum().backward()
        outs.append(y.detach())
        grads.append(xi.grad)
    assert outs[0].shape == (3, 17, 160) and outs[0].abs().max() > 0.1
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)
    assert ours.weight.grad is None  # frozen: no weight gradient


@needs_onednn
def test_any_input_layout_gives_torchs_numbers():
    """oneDNN has no kernel for some layouts (a transposed 2-D input): copied or handed back."""
    weight = torch.randn(5, 8)
    for x in (
        torch.randn(8, 4).t(),
        torch.randn(4, 6, 8).transpose(0, 1),
        torch.randn(6, 16)[:, ::2],
    ):
        assert not x.is_contiguous() and x.shape[-1] == 8
        torch.testing.assert_close(
            cpu_matmul._linear(x, weight), torch.nn.functional.linear(x, weight)
        )


def test_forcing_a_side_is_obeyed(monkeypatch):
    weight = torch.randn(64, 32)
    monkeypatch.setenv("MLXFT_CPU_MATMUL", "mkl")
    assert choose(weight, 128) == ("mkl", "torch default (MLXFT_CPU_MATMUL=mkl)")
    monkeypatch.delenv("MLXFT_CPU_MATMUL")
    side, note = choose(weight, 128)  # measured: either side, with both rates in the note
    assert side in ("mkl", "onednn") and note.count("GFLOP/s") == 1 and "measured now" in note


@needs_onednn
def test_training_on_onednn_gives_the_same_run(tiny_llama, wikisql_small, tmp_path, monkeypatch):
    """Only the frozen linears (LoRA bases, output head) move; losses and adapters match the
    torch-default run to float32 rounding."""
    results = {}
    for side in ("mkl", "onednn"):
        monkeypatch.setenv("MLXFT_CPU_MATMUL", side)
        s = Session(
            make_config(tiny_llama, wikisql_small, tmp_path / side, backend="torch", device="cpu"),
            reporter_quiet=True,
        )
        s.backend.setup_training(s.cfg)
        model = s.backend.model
        moved = [m for m in model.modules() if type(m) is OneDNNLinear]
        lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
        if side == "onednn":
            assert any(
                n == "CPU matmuls: oneDNN (MLXFT_CPU_MATMUL=onednn)"
                for n in s.backend.training_notes
            )
            assert {id(m.base) for m in lora} <= {id(m) for m in moved}
            assert model.get_output_embeddings() in moved
            assert all(not m.weight.requires_grad for m in moved)
        else:
            assert not moved
        batches = epoch_batches(s.splits["train"], 2, seed=0, epoch=0, pad_id=s.pad_id)
        losses = [s.backend.train_step(batches[i : i + 1], 1e-2)[0] for i in range(3)]
        results[side] = losses, s.backend.adapter_weights()
    np.testing.assert_allclose(results["onednn"][0], results["mkl"][0], rtol=1e-5)
    # Adam's first steps are ~lr * sign(grad): a rounding-level gradient difference on an element
    # with a near-zero gradient shows at 1e-5 of lr = 1e-2; 1e-4 is 1% of one step
    for key, value in results["mkl"][1].items():
        np.testing.assert_allclose(results["onednn"][1][key], value, rtol=0, atol=1e-4)
