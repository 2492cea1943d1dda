"""Where one training step's time goes, for one framework, as JSON on stdout.

    python benchmarks/profile_step.py mlx|torch --model DIR --data DIR --batch 4 --seq 512

Times (median of --repeats, after one warm-up) on one real batch of the data, through our
backend (`mlxft.train.Session`, LoRA r8 on all linear modules):
  step      backend.train_step (forward, backward, optimizer)
  forward   the loss alone
  fwd_bwd   loss and LoRA gradients, no optimizer
  attention the model's attention op (causal SDPA) on (B, heads, T, head_dim), forward and
            backward, times the number of blocks: its share of the step is `attention_share`
  softmax   softmax alone on (B, heads, T, T) forward, times blocks (`softmax_share`)
  loss_head cross-entropy over the vocabulary on (B, T, vocab) logits, forward and backward
            (`loss_head_share`): a logsumexp, i.e. vocab-many exp per token
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
    from mlxft.train import Session

    tmp = tempfile.mkdtemp(prefix="mlxft-profile-")
    cfg = build_config(None, {"model": str(args.model), "data": str(args.data), "backend": fw, "train": True,
                              "batch_size": args.batch, "max_seq_length": args.seq, "num_layers": -1,
                              "learning_rate": 1e-4, "optimizer": "adam", "adapter_path": str(Path(tmp) / "a")},
                       {"rank": 8, "alpha": 16.0})
    s = Session(cfg, reporter_quiet=True)
    s.backend.setup_training(cfg)
    batch = epoch_batches(s.splits["train"], cfg.batch_size, seed=0, epoch=0, pad_id=s.pad_id)[0]
    return s, batch


def profile_mlx(args) -> dict:
    import mlx.core as mx
    import mlx.nn as nn

    from mlxft.mlx_backend.backend import loss_sum

    s, batch = session("mlx", args)
    model, cfg = s.backend.model, s.backend.config
    inputs, targets, mask = mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask)
    B, T = batch.inputs.shape
    H = cfg["num_attention_heads"]
    D = cfg["hidden_size"] // H
    L = cfg["num_hidden_layers"]
    grad = nn.value_and_grad(model, loss_sum)
    V = cfg["vocab_size"]
    logits = mx.random.normal((B, T, V))
    ce_grad = mx.grad(lambda x: (nn.losses.cross_entropy(x, targets) * mask).sum())
    q, k, v = (mx.random.normal((B, H, T, D)) for _ in range(3))
    scores = mx.random.normal((B, H, T, T))
    mx.eval(q, k, v, scores, logits)

    def attn(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask="causal").sum()

    attn_grad = mx.grad(attn, argnums=(0, 1, 2))
    out = {
        "step": timed(lambda: s.backend.train_step([batch], 1e-4), args.repeats),
        "forward": timed(lambda: mx.eval(loss_sum(model, inputs, targets, mask)), args.repeats),
        "fwd_bwd": timed(lambda: mx.eval(grad(model, inputs, targets, mask)), args.repeats),
        "attention": L * timed(lambda: mx.eval(attn_grad(q, k, v)), args.repeats),
        "softmax": L * timed(lambda: mx.eval(mx.softmax(scores, axis=-1)), args.repeats),
        "loss_head": timed(lambda: mx.eval(ce_grad(logits)), args.repeats),
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
    logits = torch.randn(B * T, hf.vocab_size, requires_grad=True)
    targets = torch.as_tensor(batch.targets, dtype=torch.long).flatten()
    mask = torch.as_tensor(batch.mask).flatten()

    def loss_head():
        (F.cross_entropy(logits, targets, reduction="none") * mask).sum().backward()

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
