"""The MLX backend's CPU fast paths compute what mlx-lm's own ops compute.

Chunked head loss (mlxft.mlx_backend.loss), the power-exp causal attention swapped in for mlx-lm's
SDPA helper (mlxft.mlx_backend.attention), and the allocator thresholds (mlxft.cpu.malloc).
"""

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxft.cpu import malloc as _malloc
from mlxft.mlx_backend import attention
from mlxft.mlx_backend.attention import causal_attention, causal_bias, fast_attention, model_modules
from mlxft.mlx_backend.backend import load_mlx_model
from mlxft.mlx_backend.loss import HeadLoss, chunked_cross_entropy, exp_by_power, loss_sum


def test_exp_by_power_is_exp_to_float_rounding():
    x = mx.linspace(-80.0, 10.0, 100001)
    rel = mx.abs(exp_by_power(x) - mx.exp(x)) / mx.exp(x)
    assert mx.max(rel).item() < 1e-5
    assert mx.max(mx.where(x > -20, rel, 0)).item() < 3e-6
    assert exp_by_power(mx.array([-mx.inf])).item() == 0.0


@pytest.mark.parametrize(
    "chunk", [7 * 50, 1 << 21]
)  # 7 rows per chunk (not dividing 33), one chunk
@pytest.mark.parametrize("exp", [mx.exp, exp_by_power], ids=["mx.exp", "power"])
def test_chunked_cross_entropy_matches_value_and_gradient(chunk, exp):
    mx.random.seed(0)
    rows, dim, vocab = 33, 16, 50
    hidden, weight = mx.random.normal((rows, dim)), mx.random.normal((vocab, dim)) * 2
    targets = mx.random.randint(0, vocab, (rows,))
    mask = (mx.arange(rows) % 4 != 0).astype(mx.float32)  # every 4th row untrained

    def reference(h):
        return (nn.losses.cross_entropy(h @ weight.T, targets) * mask).sum()

    def chunked(h):
        return chunked_cross_entropy(h, weight, targets, mask, exp=exp, chunk_elements=chunk)

    value, grad = mx.value_and_grad(chunked)(hidden)
    ref_value, ref_grad = mx.value_and_grad(reference)(hidden)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-6)
    np.testing.assert_allclose(np.array(grad), np.array(ref_grad), rtol=1e-4, atol=1e-5)
    assert mx.abs(grad[::4]).max().item() == 0.0  # untrained rows get no gradient


@pytest.fixture(scope="module")
def llama(tiny_llama):
    model, _ = load_mlx_model(tiny_llama)
    model.freeze()
    return model


def test_head_loss_splits_an_untied_llama_exactly(llama):
    head = HeadLoss.of(llama, chunked=True)
    assert head is not None and head.chunked and head.head_weight() is llama.lm_head.weight
    inputs = mx.array([[5, 9, 14, 20, 33, 41], [7, 7, 8, 100, 3, 3]])
    targets = mx.roll(inputs, -1, axis=1)
    mask = mx.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], dtype=mx.float32)
    total, count = head(llama, inputs, targets, mask)
    ref_total, ref_count = loss_sum(llama, inputs, targets, mask)
    assert count.item() == ref_count.item() == 8
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-6)


def test_head_loss_declines_what_it_cannot_split(tiny_llama, stories):
    tied, _ = load_mlx_model(
        stories
    )  # stories260K ties its embeddings: the split uses embed_tokens
    tied.freeze()
    assert HeadLoss.of(tied, chunked=True).head_weight() is tied.model.embed_tokens.weight

    trainable, _ = load_mlx_model(
        tiny_llama
    )  # full fine-tuning trains the head: split, not chunked
    assert not HeadLoss.of(trainable, chunked=True).chunked

    class ScaledLogits(type(trainable)):  # an architecture that scales its logits fails the probe
        def __call__(self, inputs, *args, **kwargs):
            return super().__call__(inputs, *args, **kwargs) * 0.5

    scaled, _ = load_mlx_model(tiny_llama)
    scaled.freeze()
    scaled.__class__ = ScaledLogits
    assert HeadLoss.of(scaled) is None and HeadLoss.of(scaled, chunked=True) is None


def test_one_causal_mask_is_kept_and_shorter_ones_are_its_corner(monkeypatch):
    monkeypatch.setattr(attention, "_BIAS", [])  # as in a fresh process
    expected = np.triu(np.full((9, 9), -np.inf, np.float32), k=1)
    causal_bias(40)
    np.testing.assert_array_equal(np.array(causal_bias(9)), expected)  # a corner of the 40 one
    causal_bias(12)
    assert len(attention._BIAS) == 1 and attention._BIAS[0].shape == (40, 40)  # not one per length
    causal_bias(64)
    assert attention._BIAS[0].shape == (64, 64)
    np.testing.assert_array_equal(np.array(causal_bias(9)), expected)


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (4, 2)])
def test_causal_attention_matches_mlx_sdpa(q_heads, kv_heads):
    mx.random.seed(1)
    q = mx.random.normal((2, q_heads, 37, 16))
    k, v = mx.random.normal((2, kv_heads, 37, 16)), mx.random.normal((2, kv_heads, 37, 16))
    scale = 16**-0.5

    def ours(q, k, v):
        return causal_attention(q, k, v, scale)

    def sdpa(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")

    np.testing.assert_allclose(np.array(ours(q, k, v)), np.array(sdpa(q, k, v)), atol=1e-6)
    weights = mx.random.normal((2, q_heads, 37, 16))
    for a, b in zip(
        mx.grad(lambda *x: (ours(*x) * weights).sum(), argnums=(0, 1, 2))(q, k, v),
        mx.grad(lambda *x: (sdpa(*x) * weights).sum(), argnums=(0, 1, 2))(q, k, v),
    ):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)


def test_fast_attention_is_scoped_and_keeps_the_model_output(llama):
    module = sys.modules[type(llama).__module__]
    original = module.scaled_dot_product_attention
    assert module in model_modules(llama)
    inputs = mx.array([[5, 9, 14, 20, 33, 41, 2, 8]])
    before = llama(inputs)
    with fast_attention(llama):
        assert module.scaled_dot_product_attention is not original
        assert module.scaled_dot_product_attention.original is original
        inside = llama(inputs)
    assert module.scaled_dot_product_attention is original  # restored
    np.testing.assert_allclose(np.array(inside), np.array(before), atol=1e-5)


def test_fast_attention_hands_uncovered_calls_to_the_original(llama):
    from mlx_lm.models.cache import make_prompt_cache

    module = sys.modules[type(llama).__module__]
    prompt = mx.array([[5, 9, 14, 20]])
    cache = make_prompt_cache(llama)
    with fast_attention(llama):  # a KV cache (generation) and one-token steps take mlx-lm's path
        logits = llama(prompt, cache=cache)
        step = llama(mx.array([[33]]), cache=cache)
    assert module.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"
    full = llama(mx.array([[5, 9, 14, 20, 33]]))
    np.testing.assert_allclose(np.array(step[0, -1]), np.array(full[0, -1]), atol=1e-5)
    np.testing.assert_allclose(np.array(logits[0, -1]), np.array(full[0, 3]), atol=1e-5)


def test_malloc_tuning_reports_and_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("MLXFT_MALLOC", "system")
    assert _malloc._apply() == "system (MLXFT_MALLOC=system)"
    monkeypatch.delenv("MLXFT_MALLOC")
    expected = (
        "glibc, freed memory kept for reuse" if sys.platform.startswith("linux") else "system"
    )
    assert _malloc._apply() == expected
