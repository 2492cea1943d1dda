"""DoRA (`fine_tune_type: dora`) in PEFT's layout: PEFT loads our adapter with equal logits,
and our gradients are PEFT's (the weight norm is a constant, DoRA paper section 4.3)."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file

from mlxft.errors import UserError
from mlxft.mlx_backend.backend import loss_sum
from mlxft.mlx_backend.dora import DoRALinear
from mlxft.training.session import Session
from tests.session_helpers import make_config, token_ids, train, train_losses

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def dora_run(tiny_llama, tmp_path_factory):
    """A DoRA adapter trained 6 steps on tiny llama (so B != 0 and m has moved)."""
    from tests.conftest import WIKISQL

    out = tmp_path_factory.mktemp("dora") / "adapter"
    session = train(tiny_llama, WIKISQL, out, fine_tune_type="dora", iters=6, rank=4)
    return session, out


def _peft_model(base_dir, adapter_dir, train_mode=False):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=train_mode)
    return model.train() if train_mode else model.eval()


def test_dora_files_are_peft_layout(dora_run, tiny_llama):
    session, out = dora_run
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    weights = load_file(str(out / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"
    assert weights[key].shape == (64,)
    assert sum(k.endswith("lora_magnitude_vector") for k in weights) == 14
    # trained: B moved off zero and m off its start ||W||_row
    base = load_file(str(tiny_llama / "model.safetensors"))[
        "model.layers.1.self_attn.q_proj.weight"
    ]
    assert np.abs(weights[key] - np.linalg.norm(base, axis=1)).max() > 1e-3
    assert np.abs(weights[key.replace("lora_magnitude_vector", "lora_B.weight")]).max() > 1e-3
    losses = train_losses(out)
    assert losses[-1] < losses[0]


def test_peft_loads_our_dora_adapter_with_equal_logits(dora_run, tiny_llama):
    session, out = dora_run
    ids = token_ids(320)
    ours = session.backend.logits(ids)
    model = _peft_model(tiny_llama, out)
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
        # and PEFT's merged weights are our fused ones
        merged = model.merge_and_unload().state_dict()
    layer = dict(session.backend.model.named_modules())["model.layers.0.mlp.up_proj"]
    np.testing.assert_allclose(
        np.array(layer.fused_weight()),
        merged["model.layers.0.mlp.up_proj.weight"].numpy(),
        atol=1e-5,
    )


def test_dora_gradients_match_peft(dora_run, tiny_llama):
    """Same loss and gradients for A, B and m on one batch: the norm is detached in both."""
    session, out = dora_run
    ids = token_ids(320, shape=(2, 16), seed=3)
    inputs, targets, mask = ids[:, :-1], ids[:, 1:], np.ones((2, 15), np.float32)
    model = session.backend.model
    model.train()
    step = nn.value_and_grad(model, loss_sum)
    (total, count), grads = step(model, mx.array(inputs), mx.array(targets), mx.array(mask))
    ours = {k: np.array(v) for k, v in tree_flatten(grads)}

    pm = _peft_model(tiny_llama, out, train_mode=True)
    logits = pm(torch.tensor(inputs)).logits
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.tensor(targets).reshape(-1), reduction="sum"
    )
    loss.backward()
    assert abs(loss.item() - total.item()) < 1e-3
    theirs = {}
    for name, p in pm.named_parameters():
        if p.grad is not None:
            key = (
                name.removeprefix("base_model.model.")
                .replace(".default", "")
                .replace(".weight", "")
            )
            theirs[key] = p.grad.numpy()
    assert len(ours) == len(theirs) == 42
    for key, grad in ours.items():
        np.testing.assert_allclose(grad, theirs[key], atol=1e-4, rtol=1e-3, err_msg=key)


def test_untrained_dora_equals_the_base_model(tiny_llama, wikisql_small, tmp_path):
    session = Session(
        make_config(tiny_llama, wikisql_small, tmp_path / "out", fine_tune_type="dora")
    )
    ids = token_ids(320)
    with_dora = session.backend.logits(ids)
    layers = [m for _, m in session.backend.model.named_modules() if isinstance(m, DoRALinear)]
    for layer in layers:
        layer.lora_magnitude_vector = layer.lora_magnitude_vector * 1.5
    assert (
        np.abs(session.backend.logits(ids) - with_dora).max() > 1e-2
    )  # m is live in the forward pass
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(with_dora, base(torch.tensor(ids)).logits.numpy(), atol=1e-4)


def test_dora_adapter_into_a_lora_run_is_refused(dora_run, tiny_llama, wikisql_small, tmp_path):
    _, out = dora_run
    cfg = make_config(tiny_llama, wikisql_small, tmp_path / "out", resume_adapter_file=str(out))
    with pytest.raises(UserError, match="DoRA weights .* set fine_tune_type"):
        Session(cfg)


@pytest.mark.usefixtures("one_torch_thread")
def test_dora_backends_agree(tiny_llama, tmp_path):
    """Per-step training loss of MLX and torch DoRA within 1e-3 over 10 steps, and the same
    adapter."""
    from tests.conftest import WIKISQL

    losses, weights = {}, {}
    for backend in ("mlx", "torch"):
        out = tmp_path / backend
        train(tiny_llama, WIKISQL, out, fine_tune_type="dora", iters=10, backend=backend)
        losses[backend] = np.array(train_losses(out))
        weights[backend] = load_file(str(out / "adapter_model.safetensors"))
    assert len(losses["mlx"]) == 10 and losses["mlx"][-1] < losses["mlx"][0]
    np.testing.assert_allclose(losses["mlx"], losses["torch"], atol=1e-3)
    assert weights["mlx"].keys() == weights["torch"].keys()
    for key, value in weights["mlx"].items():
        np.testing.assert_allclose(value, weights["torch"][key], atol=1e-3, err_msg=key)


def _peft_dropout_formula(x, xd, w, bias, a, b, m, s):
    """PEFT 0.21 DoraLinearVariant.forward in training with dropout, written out in numpy:
    base(x) + (f - 1) * xd Wᵀ + f * s * xd Aᵀ Bᵀ, f = m / ||W + s B A||_row."""
    f = m / np.linalg.norm(w + s * b @ a, axis=1)
    return x @ w.T + bias + (f - 1) * (xd @ w.T) + f * s * (xd @ a.T @ b.T)


def test_dora_dropout_follows_peft_on_both_backends():
    """In training the dropped-out x feeds the correction term, the base output stays undropped;
    in eval dropout is off.  The mask is recovered from the layer's own dropout module."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.2, (24, 16)).astype(np.float32)
    bias = rng.normal(0, 0.1, 24).astype(np.float32)
    a, b = (
        rng.normal(0, 0.2, (4, 16)).astype(np.float32),
        rng.normal(0, 0.2, (24, 4)).astype(np.float32),
    )
    m = rng.uniform(0.5, 2, 24).astype(np.float32)
    x = rng.normal(size=(3, 16)).astype(np.float32)

    base = nn.Linear(16, 24)
    base.weight, base.bias = mx.array(w), mx.array(bias)
    layer = DoRALinear(base, a, b, scale=2.0, dropout=0.5)
    layer.lora_magnitude_vector = mx.array(m)
    layer.train()
    mx.random.seed(7)
    out = np.array(layer(mx.array(x)))
    mx.random.seed(7)
    xd = np.array(layer.dropout(mx.array(x)))
    assert 0 < (xd == 0).mean() < 1
    np.testing.assert_allclose(out, _peft_dropout_formula(x, xd, w, bias, a, b, m, 2.0), atol=1e-5)
    layer.eval()
    np.testing.assert_allclose(
        np.array(layer(mx.array(x))), _peft_dropout_formula(x, x, w, bias, a, b, m, 2.0), atol=1e-5
    )

    from mlxft.torch_backend.dora import DoRALinear as TorchDoRA

    tbase = torch.nn.Linear(16, 24)
    with torch.no_grad():
        tbase.weight.copy_(torch.tensor(w))
        tbase.bias.copy_(torch.tensor(bias))
    tlayer = TorchDoRA(tbase, a, b, scale=2.0, dropout=0.5)
    with torch.no_grad():
        tlayer.lora_magnitude_vector.copy_(torch.tensor(m))
        torch.manual_seed(7)
        out = tlayer(torch.tensor(x)).numpy()
        torch.manual_seed(7)
        xd = tlayer.dropout(torch.tensor(x)).numpy()
        np.testing.assert_allclose(
            out, _peft_dropout_formula(x, xd, w, bias, a, b, m, 2.0), atol=1e-5
        )
        tlayer.dropout.eval()
        np.testing.assert_allclose(
            tlayer(torch.tensor(x)).numpy(),
            _peft_dropout_formula(x, x, w, bias, a, b, m, 2.0),
            atol=1e-5,
        )
