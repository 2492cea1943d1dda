"""The output head runs on trained positions only (mlxft.data.batching.head_rows), on both
backends, and that changes nothing but the time: same loss, same gradients, same weights.

With a prompt masked most positions carry no target; the head (dim x vocab per position) is
skipped there.  Measured on the 40M bench model, WikiSQL as prompt/completion, batch 4:
torch 480 -> 382 ms per step, MLX 630 -> 513 ms (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlxft.data import epoch_batches, head_rows
from mlxft.training.session import Session
from tests.conftest import write_wikisql
from tests.session_helpers import make_config


def test_head_rows_picks_trained_positions_and_pads_with_an_untrained_one(monkeypatch):
    mask = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 0]], dtype=np.float32)
    assert head_rows(mask).tolist() == [2, 3, 6, 7, 8]
    padded = head_rows(mask, multiple=4)
    assert padded.tolist() == [2, 3, 6, 7, 8, 0, 0, 0] and mask.reshape(-1)[padded[5:]].sum() == 0
    assert head_rows(np.ones((2, 5), np.float32)) is None  # nearly all trained: not worth a gather
    assert head_rows(np.array([[1] * 39 + [0]], np.float32)) is None  # 97.5% trained
    assert len(head_rows(np.array([[1] * 19 + [0]], np.float32))) == 19  # 95%: gathered
    monkeypatch.setenv("MLXFT_HEAD_ROWS", "0")
    assert head_rows(mask) is None


@pytest.fixture(scope="module")
def completions(tmp_path_factory):
    """WikiSQL rows as prompt/completion: with mask_prompt only the SQL (~1/4 of tokens) trains."""
    src = write_wikisql(tmp_path_factory.mktemp("wikisql_text"), 16, 8)
    out = tmp_path_factory.mktemp("wikisql_completions")
    for name in ("train", "valid"):
        rows = []
        for line in (src / f"{name}.jsonl").read_text().splitlines():
            text = json.loads(line)["text"]
            cut = text.index("\nA: ") + 4
            rows.append(json.dumps({"prompt": text[:cut], "completion": text[cut:]}))
        (out / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    return out


def _one_step(model, data, out, backend, monkeypatch, rows: bool):
    """(val loss sum, first step's (loss, tokens, grad norm), adapter weights after it, notes)."""
    monkeypatch.setenv("MLXFT_HEAD_ROWS", "1" if rows else "0")
    cfg = make_config(
        model, data, out, backend=backend, batch_size=4, mask_prompt=True, max_seq_length=1024
    )
    session = Session(cfg, reporter_quiet=True)
    b = session.backend
    b.setup_training(cfg)
    batches = epoch_batches(session.splits["train"], 4, seed=0, epoch=0, pad_id=session.pad_id)
    assert head_rows(batches[0].mask) is not None or not rows  # the test exercises the gather
    val = b.eval_loss(batches[1:3])
    step = b.train_step(batches[:1], 1e-2)
    return val, step, b.adapter_weights(), b.training_notes


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_head_on_trained_rows_changes_nothing_but_time(
    backend, tiny_llama, completions, tmp_path, monkeypatch
):
    if backend == "torch":
        pytest.importorskip("torch")
    on = _one_step(tiny_llama, completions, tmp_path / "on", backend, monkeypatch, rows=True)
    off = _one_step(tiny_llama, completions, tmp_path / "off", backend, monkeypatch, rows=False)
    assert "output head: on trained positions only" in " ".join(on[3])
    assert "output head: on every position (MLXFT_HEAD_ROWS=0)" in " ".join(off[3])
    (val_on, n_on), (val_off, n_off) = on[0], off[0]
    assert n_on == n_off > 0 and val_on == pytest.approx(val_off, rel=1e-5)
    assert on[1][1] == off[1][1] and on[1][0] == pytest.approx(off[1][0], rel=1e-5)
    assert on[1][2] == pytest.approx(off[1][2], rel=1e-4)  # gradient norm
    assert on[2].keys() == off[2].keys()
    for key in on[2]:
        np.testing.assert_allclose(on[2][key], off[2][key], rtol=1e-4, atol=1e-6)


def test_backends_agree_on_trained_rows(tiny_llama, completions, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    mlx = _one_step(tiny_llama, completions, tmp_path / "mlx", "mlx", monkeypatch, rows=True)
    torch_ = _one_step(tiny_llama, completions, tmp_path / "torch", "torch", monkeypatch, rows=True)
    assert mlx[0][1] == torch_[0][1] and mlx[0][0] == pytest.approx(torch_[0][0], rel=1e-5)
    assert mlx[1][0] == pytest.approx(torch_[1][0], rel=1e-5) and mlx[1][2] == pytest.approx(
        torch_[1][2], rel=1e-4
    )


def test_a_quantized_head_splits_without_chunking(tiny_llama, tmp_path):
    import mlx.core as mx

    from mlxft.convert import to_mlx
    from mlxft.mlx_backend.backend import load_mlx_model
    from mlxft.mlx_backend.loss import HeadLoss, loss_sum

    model, _ = load_mlx_model(
        to_mlx(tiny_llama, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32)
    )
    model.freeze()
    head = HeadLoss.of(model, chunked=True)
    assert head is not None and not head.chunked  # packed weights: the module runs the head
    inputs = mx.array([[5, 9, 14, 20, 33, 41], [7, 7, 8, 100, 3, 3]])
    targets = mx.roll(inputs, -1, axis=1)
    mask = mx.array([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 0, 0]], dtype=mx.float32)
    rows = mx.array(head_rows(np.array(mask)))
    total, count = head(model, inputs, targets, mask, rows)
    ref_total, ref_count = loss_sum(model, inputs, targets, mask)
    assert count.item() == ref_count.item() == 4
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-5)


def test_torch_keeps_the_head_inside_a_model_that_scales_its_logits(
    tiny_llama, wikisql_small, tmp_path
):
    pytest.importorskip("torch")
    cfg = make_config(tiny_llama, wikisql_small, tmp_path / "out", backend="torch")
    session = Session(cfg, reporter_quiet=True)
    model = session.backend.model
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled
    session.backend.setup_training(cfg)
    assert session.backend._split is None
    assert session.backend.training_notes[-1].startswith("output head: inside the model")
