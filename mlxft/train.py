"""The fine-tuning recipe: config -> data -> batches -> backend step -> metrics -> adapter files.

One loop for both backends (the backend owns only tensor work), short enough to read on
one screen.  Validation runs before the first update, every `steps_per_eval` and at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from mlxft.adapters import plan_adapters
from mlxft.adapters.files import adapter_config, load_adapter, save_adapter
from mlxft.backend import get_backend
from mlxft.config import Config, save_config, total_iters
from mlxft.data import epoch_batches, eval_batches, load_splits, pad_token_id, padding_fraction
from mlxft.errors import UserError
from mlxft.fileio import atomic_dir, check_writable
from mlxft.metrics import Reporter
from mlxft.models import resolve_model
from mlxft.schedule import learning_rate

CONFIG_FILE = "mlxft_config.yaml"


@dataclass
class Position:
    """Where training stands: enough to resume exactly (with optimizer state and RNG)."""

    step: int = 0
    epoch: int = 0
    index: int = 0  # next batch within the epoch
    trained_tokens: int = 0


def load_tokenizer(model_path: Path, cfg: Config):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"{model_path}: cannot load the tokenizer ({str(err).splitlines()[0]})") from None


class Session:
    """A model + tokenizer + data, loaded once; train() and test() work on it."""

    def __init__(self, cfg: Config, reporter_quiet: bool = False):
        self.cfg = cfg
        self.out = Path(cfg.adapter_path)
        if cfg.train:
            check_writable(self.out)
        self.model_path = resolve_model(cfg.model, cfg.revision)
        self.tokenizer = load_tokenizer(self.model_path, cfg)
        self.splits = load_splits(cfg, self.tokenizer)
        self.pad_id = pad_token_id(self.tokenizer)
        self.backend = get_backend(cfg)
        self.backend.load(self.model_path)
        self.plan = None
        self.quiet = reporter_quiet
        if cfg.fine_tune_type != "full":
            self.plan = plan_adapters(self.backend.linear_modules(), self.backend.num_blocks(), cfg)
            self.backend.add_adapters(self.plan)
        start = cfg.resume_adapter_file or (None if cfg.train else cfg.adapter_path)
        if start:
            self._load_start_weights(Path(start))

    def _load_start_weights(self, path: Path) -> None:
        adapter_dir = path.parent if path.is_file() else path
        _, weights = load_adapter(adapter_dir)
        self.backend.set_adapter_weights(weights)

    # ------------------------------------------------------------------ header
    def header(self, iters: int, batches_per_epoch: int, pad_frac: float) -> list:
        cfg, b = self.cfg, self.backend
        trainable, total = b.parameter_counts()
        lines = [f"Model {cfg.model} ({b.dtype}) on {b.name}:{b.device}"]
        if b.name == "mlx" and b.device == "cpu":
            from mlxft import _blas

            lines.append(f"BLAS: {_blas.status()}")
        lines.append(f"Trainable parameters: {100 * trainable / max(total, 1):.3f}% ({trainable / 1e6:.3f}M/{total / 1e6:.3f}M)")
        if self.plan:
            p = self.plan
            lines.append(
                f"{p.kind.upper()}: rank {p.rank}, scale {p.scale:g} (alpha {p.scale * p.rank:g}), dropout {p.dropout:g}, "
                f"{len(p.targets)} modules ({', '.join(p.module_names)}) in layers {p.layers[0]}-{p.layers[-1]} of {p.num_blocks}"
            )
        for name, split in self.splits.items():
            extra = f", {split.truncated} truncated to {cfg.max_seq_length} tokens" if split.truncated else ""
            dropped = getattr(split, "dropped", 0)
            extra += f", {dropped} dropped (no target tokens left)" if dropped else ""
            lines.append(f"Data {name}: {len(split.sequences)} examples ({split.format}) from {split.source}{extra}")
        epochs = iters * cfg.grad_accumulation_steps / max(1, batches_per_epoch)
        lines.append(
            f"Training {iters} steps (~{epochs:.2f} epochs) of {cfg.grad_accumulation_steps}x{cfg.batch_size} sequences; "
            f"padding {100 * pad_frac:.1f}% of batch positions (length-sorted)"
        )
        return lines

    # ------------------------------------------------------------------ train
    def train(self) -> Path:
        cfg, backend = self.cfg, self.backend
        train_split, valid_split = self.splits["train"], self.splits["valid"]
        first_epoch = epoch_batches(train_split, cfg.batch_size, seed=cfg.seed, epoch=0, pad_id=self.pad_id)
        iters = total_iters(cfg, len(first_epoch))
        val = eval_batches(valid_split, cfg.batch_size, self.pad_id, cfg.val_batches)
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.out / CONFIG_FILE)
        reporter = Reporter(self.out / "metrics.jsonl", iters, quiet=self.quiet)
        for line in self.header(iters, len(first_epoch), padding_fraction(first_epoch)):
            reporter.echo(line)
        backend.setup_training(cfg)
        backend.reset_peak_memory()
        pos = Position()
        stream = _batches(train_split, cfg, self.pad_id, pos)
        window = {"loss": 0.0, "tokens": 0, "steps": 0, "seconds": 0.0}
        run_tokens, run_seconds = 0, 0.0

        def evaluate(step: int):
            tic = time.perf_counter()
            total, count = backend.eval_loss(val)
            lr_now = learning_rate(min(step, iters - 1), cfg.learning_rate, cfg.lr_schedule, iters)
            reporter.evaluation(step, "val", total / max(count, 1), count, time.perf_counter() - tic, lr_now,
                                pos.step / run_seconds if run_seconds else 0.0,
                                run_tokens / run_seconds if run_seconds else 0.0, pos.trained_tokens,
                                backend.peak_memory_gb())
            return total / max(count, 1)

        self.first_val_loss = evaluate(0)
        try:
            while pos.step < iters:
                lr = learning_rate(pos.step, cfg.learning_rate, cfg.lr_schedule, iters)
                group = [next(stream) for _ in range(cfg.grad_accumulation_steps)]
                tic = time.perf_counter()
                loss_total, tokens, grad_norm = backend.train_step(group, lr)
                seconds = time.perf_counter() - tic
                pos.step += 1
                pos.trained_tokens += tokens
                run_tokens, run_seconds = run_tokens + tokens, run_seconds + seconds
                for key, value in (("loss", loss_total), ("tokens", tokens), ("steps", 1), ("seconds", seconds)):
                    window[key] += value
                reporter.progress(pos.step)
                if pos.step % cfg.steps_per_report == 0 or pos.step == iters:
                    reporter.train(pos.step, window["loss"] / max(window["tokens"], 1), lr,
                                   window["steps"] / window["seconds"], window["tokens"] / window["seconds"],
                                   pos.trained_tokens, backend.peak_memory_gb(), grad_norm)
                    window = dict.fromkeys(window, 0)
                if pos.step % cfg.steps_per_eval == 0 or pos.step == iters:
                    self.last_val_loss = evaluate(pos.step)
                if pos.step % cfg.save_every == 0 and pos.step != iters:
                    self.save_checkpoint(pos)
        finally:
            reporter.close()
        self.save_adapter(self.out)
        reporter.echo(f"Saved adapter to {self.out} (PEFT layout: adapter_config.json, adapter_model.safetensors)")
        return self.out

    def save_adapter(self, out_dir: Path) -> None:
        save_adapter(out_dir, self.backend.adapter_weights(), adapter_config(self.plan, self.cfg.model))

    def save_checkpoint(self, pos: Position) -> Path:
        root = self.out / "checkpoints"
        target = root / f"step-{pos.step:07d}"
        with atomic_dir(target) as tmp:
            self.save_adapter(tmp)
            save_config(self.cfg, tmp / CONFIG_FILE)
        old = sorted(root.glob("step-*"))[: -self.cfg.keep_checkpoints]
        for path in old:
            import shutil

            shutil.rmtree(path, ignore_errors=True)
        return target

    # ------------------------------------------------------------------ test
    def test(self) -> float:
        if "test" not in self.splits:
            raise UserError(f"{self.cfg.data}: no test.jsonl for --test")
        batches = eval_batches(self.splits["test"], self.cfg.batch_size, self.pad_id, self.cfg.test_batches)
        total, count = self.backend.eval_loss(batches)
        loss = total / max(count, 1)
        import math

        if not self.quiet:
            print(f"Test loss {loss:.3f}, Test ppl {math.exp(min(loss, 700)):.3f}.")
        return loss


def _batches(split, cfg: Config, pad_id: int, pos: Position):
    """Training batches forever, epoch after epoch, tracking the position for checkpoints."""
    while True:
        batches = epoch_batches(split, cfg.batch_size, seed=cfg.seed, epoch=pos.epoch, pad_id=pad_id)
        while pos.index < len(batches):
            batch = batches[pos.index]
            pos.index += 1
            yield batch
        pos.epoch, pos.index = pos.epoch + 1, 0
