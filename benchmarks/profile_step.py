"""Where one training step's time goes, for one framework, as JSON on stdout.

    python benchmarks/profile_step.py mlx|torch --model DIR --data DIR --batch 4 --seq 512

Times (median of --repeats, after one warm-up) on one real batch of the data, through our
backend (`mlxft.training.session.Session`, LoRA r8 on all linear modules):
  step      backend.train_step (forward, backward, optimizer)
  forward   the loss alone
  fwd_bwd   loss and LoRA gradients, no optimizer
  attention the attention the step runs on (B, heads, T, head_dim), forward and backward,
            times the number of blocks (`attention_share`); MLX: ours on the CPU
            (mlxft.mlx_backend.attention), with MLX's own SDPA as `attention_mlx_sdpa`
  softmax   the softmax's exp part alone on (B, heads, T, T) forward, times blocks
            (`softmax_share`); MLX: ours, with `softmax_mlx` for mx.softmax
  loss_head output head matmul + cross-entropy over the vocabulary, forward and backward
            (`loss_head_share`); MLX: the chunked head loss, with the plain one as
            `loss_head_plain`
  exp       elementwise exp throughput (M elements/s) on the attention-score tensor
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlxft  # noqa: F401  (OpenBLAS before mlx.core)


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def session(fw: str, args):
    from mlxft.config import build_config
    from mlxft.data import epoch_batches
    from mlxft.training.session import Session

    tmp = tempfile.mkdtemp(prefix="mlxft-profile-")
    cfg = build_config(
        None,
        {
            "model": str(args.model),
            "data": str(args.data),
            "backend": fw,
            "train": True,
            "batch_size": args.batch,
            "max_seq_length": args.seq,
            "num_layers": -1,
            "learning_rate": 1e-4,
            "optimizer": "adam",
            "adapter_path": str(Path(tmp) / "a"),
        },
        {"rank": 8, "alpha": 16.0},
    )
    s = Session(cfg, reporter_quiet=True)
    s.backend.setup_training(cfg)
    batch = epoch_batches(s.splits["train"], cfg.batch_size, seed=0, epoch=0, pad_id=s.pad_id)[0]
    return s, batch


def profile_mlx(args) -> dict:
    import mlx.core as mx
    import mlx.nn as nn

    from mlxft.mlx_backend.attention import causal_attention, shifted_exp
    from mlxft.mlx_backend.loss import chunked_cross_entropy

    s, batch = session("mlx", args)
    backend = s.backend
    model, cfg, loss = backend.model, backend.config, backend._loss  # the loss our step trains with
    inputs, targets, mask = mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask)
    B, T = batch.inputs.shape
    H = cfg["num_attention_heads"]
    D = cfg["hidden_size"] // H
    L = cfg["num_hidden_layers"]
    grad = nn.value_and_grad(model, loss)
    V = cfg["vocab_size"]
    weight = mx.random.normal((V, cfg["hidden_size"])) * 0.02
    hidden = mx.random.normal((B * T, cfg["hidden_size"]))
    flat_t, flat_m = targets.reshape(-1), mask.reshape(-1).astype(mx.float32)
    plain_head = mx.grad(lambda h: (nn.losses.cross_entropy(h @ weight.T, flat_t) * flat_m).sum())
    chunked_head = mx.grad(lambda h: chunked_cross_entropy(h, weight, flat_t, flat_m))
    q, k, v = (mx.random.normal((B, H, T, D)) for _ in range(3))
    scores = mx.random.normal((B, H, T, T))
    mx.eval(q, k, v, scores, weight, hidden)

    def sdpa(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask="causal").sum()

    def ours(q, k, v):
        return causal_attention(q, k, v, D**-0.5).sum()

    def in_step(fn):  # our attention is swapped in only inside the backend's steps
        def run():
            with backend._kernels():
                out = fn()
            mx.eval(out)

        return run

    out = {
        "step": timed(lambda: backend.train_step([batch], 1e-4), args.repeats),
        "forward": timed(in_step(lambda: loss(model, inputs, targets, mask)), args.repeats),
        "fwd_bwd": timed(in_step(lambda: grad(model, inputs, targets, mask)), args.repeats),
        "attention": L
        * timed(lambda: mx.eval(mx.grad(ours, argnums=(0, 1, 2))(q, k, v)), args.repeats),
        "attention_mlx_sdpa": L
        * timed(lambda: mx.eval(mx.grad(sdpa, argnums=(0, 1, 2))(q, k, v)), args.repeats),
        "softmax": L * timed(lambda: mx.eval(shifted_exp(scores).sum(-1)), args.repeats),
        "softmax_mlx": L * timed(lambda: mx.eval(mx.softmax(scores, axis=-1)), args.repeats),
        "loss_head": timed(lambda: mx.eval(chunked_head(hidden)), args.repeats),
        "loss_head_plain": timed(lambda: mx.eval(plain_head(hidden)), args.repeats),
    }
    exp_s = timed(lambda: mx.eval(mx.exp(scores)), args.repeats)
    out["exp_melem_per_s"] = scores.size / exp_s / 1e6
    return finish(out, B, T, H, L)


def profile_torch(args) -> dict:
    import torch
    import torch.nn.functional as F

    s, batch = session("torch", args)
    hf = s.backend.model.config
    B, T = batch.inputs.shape
    H, L = hf.num_attention_heads, hf.num_hidden_layers
    D = hf.hidden_size // H
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    scores = torch.randn(B, H, T, T)
    head = s.backend.model.get_output_embeddings()  # the module our step runs (oneDNN where chosen)
    hidden = torch.randn(B * T, hf.hidden_size, requires_grad=True)
    targets = torch.as_tensor(batch.targets, dtype=torch.long).flatten()
    mask = torch.as_tensor(batch.mask).flatten()

    def loss_head():
        (F.cross_entropy(head(hidden), targets, reduction="none") * mask).sum().backward()

    def attn():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    def forward():
        with torch.no_grad():
            s.backend.eval_loss([batch])

    out = {
        "step": timed(lambda: s.backend.train_step([batch], 1e-4), args.repeats),
        "forward": timed(forward, args.repeats),
        "attention": L * timed(attn, args.repeats),
        "softmax": L * timed(lambda: torch.softmax(scores, dim=-1), args.repeats),
        "loss_head": timed(loss_head, args.repeats),
    }
    exp_s = timed(lambda: torch.exp(scores), args.repeats)
    out["exp_melem_per_s"] = scores.numel() / exp_s / 1e6
    out["threads"] = torch.get_num_threads()
    return finish(out, B, T, H, L)


def finish(out: dict, B: int, T: int, H: int, L: int) -> dict:
    out.update(batch=B, seq=T, heads=H, blocks=L, tokens_per_second=B * T / out["step"])
    out["attention_share"] = out["attention"] / out["step"]
    out["softmax_share"] = out["softmax"] / out["step"]
    out["loss_head_share"] = out["loss_head"] / out["step"]
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("framework", choices=["mlx", "torch"])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    result = (profile_mlx if args.framework == "mlx" else profile_torch)(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
