"""The fine-tuning recipe: config -> data -> batches -> backend step -> metrics -> adapter files.

One loop for both backends (the backend owns only tensor work), short enough to read on
one screen.  Validation runs before the first update, every `steps_per_eval` and at the end.
Checkpoints (`mlxft.resume`) let `--resume` continue a killed run exactly; `mlxft.guards`
stops it cleanly on a diverged loss, out of memory or Ctrl-C.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from mlxft import guards, planner, resume
from mlxft.adapters import plan_adapters
from mlxft.adapters.files import adapter_config, load_adapter, save_adapter
from mlxft.backend import get_backend
from mlxft.config import Config, save_config, total_iters
from mlxft.data import epoch_batches, eval_batches, load_splits, pad_token_id, padding_fraction
from mlxft.errors import UserError
from mlxft.fileio import check_writable
from mlxft.metrics import Reporter
from mlxft.models import resolve_model
from mlxft.resume import Position  # noqa: F401  (re-exported: the loop's data position)
from mlxft.schedule import learning_rate

CONFIG_FILE = "mlxft_config.yaml"


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
        self.checkpoint = resume.find_checkpoint(cfg) if cfg.train else None
        self.model_path = resolve_model(cfg.model, cfg.revision)
        self.tokenizer = load_tokenizer(self.model_path, cfg)
        self.splits = load_splits(cfg, self.tokenizer)
        self.pad_id = pad_token_id(self.tokenizer)
        self.backend = get_backend(cfg)
        full_resume = self.checkpoint is not None and cfg.fine_tune_type == "full"
        self.backend.load(self.checkpoint if full_resume else self.model_path)  # a full checkpoint is a model dir
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
        elif cfg.fine_tune_type == "full":
            from mlxft.adapters.targets import full_layers

            blocks, everything = full_layers(b.num_blocks(), cfg.num_layers)
            scope = "all weights" if everything else f"blocks {blocks[0]}-{blocks[-1]} of {b.num_blocks()} (embeddings frozen)"
            lines.append(f"FULL fine-tune: {scope}")
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
    def memory_line(self, longest: int) -> str:
        """The planner's one-line estimate (advisory: a model it cannot read still trains)."""
        try:
            tensors = planner.model_tensors(self.model_path)
            est = planner.estimate(self.cfg, self.model_path, longest, tensors)
            budget, what = planner.machine_memory(self.cfg.backend)
            advice = planner.knobs(self.cfg, self.model_path, longest, budget, tensors) if est.total > 0.75 * budget else []
        except (UserError, KeyError, ValueError, TypeError) as err:
            self.estimate = None
            return f"Memory: no estimate ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        self.estimate = est
        return f"Memory: {est.summary()}; {planner.verdict(est, budget, what, advice)}"

    def train(self) -> Path:
        cfg, backend = self.cfg, self.backend
        train_split, valid_split = self.splits["train"], self.splits["valid"]
        first_epoch = epoch_batches(train_split, cfg.batch_size, seed=cfg.seed, epoch=0, pad_id=self.pad_id)
        iters = total_iters(cfg, len(first_epoch))
        val = eval_batches(valid_split, cfg.batch_size, self.pad_id, cfg.val_batches)
        self.longest = longest = max(len(s) for s in train_split.sequences)
        pos, notes, restored = self._start(iters)
        reporter = Reporter(self.out / "metrics.jsonl", iters, quiet=self.quiet)
        for line in self.header(iters, len(first_epoch), padding_fraction(first_epoch)) + [self.memory_line(longest)]:
            reporter.echo(line)
        backend.setup_training(cfg)
        notes += getattr(backend, "training_notes", [])
        if restored:
            notes += self._restore(*restored)
            notes.append(f"Resuming from {self.checkpoint} at step {pos.step} (epoch {pos.epoch}, batch {pos.index})")
        for note in filter(None, notes):
            reporter.echo(note)
        backend.reset_peak_memory()
        stream = _batches(train_split, cfg, self.pad_id, pos)
        window = {"loss": 0.0, "tokens": 0, "steps": 0, "seconds": 0.0}
        run_tokens, run_seconds = 0, 0.0
        self.last_checkpoint, self._saved_step = self.checkpoint, pos.step
        self.first_val_loss = None

        def evaluate(step: int):
            tic = time.perf_counter()
            total, count = self._guarded(backend.eval_loss, val)
            lr_now = learning_rate(min(step, iters - 1), cfg.learning_rate, cfg.lr_schedule, iters)
            reporter.evaluation(step, "val", total / max(count, 1), count, time.perf_counter() - tic, lr_now,
                                pos.step / run_seconds if run_seconds else 0.0,
                                run_tokens / run_seconds if run_seconds else 0.0, pos.trained_tokens,
                                backend.peak_memory_gb())
            return total / max(count, 1)

        with guards.StopRequest() as stop:
            try:
                if not self.checkpoint:
                    self.first_val_loss = evaluate(0)
                while pos.step < iters and not stop.requested:
                    lr = learning_rate(pos.step, cfg.learning_rate, cfg.lr_schedule, iters)
                    group = [next(stream) for _ in range(cfg.grad_accumulation_steps)]
                    tic = time.perf_counter()
                    loss_total, tokens, grad_norm = self._guarded(backend.train_step, group, lr)
                    seconds = time.perf_counter() - tic
                    guards.check_finite(pos.step + 1, loss_total / max(tokens, 1), grad_norm, lr, cfg,
                                        self.last_checkpoint)
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
                if stop.requested and pos.step < iters:
                    self._interrupted(pos)
            finally:
                reporter.close()
        self.save_adapter(self.out)
        reporter.echo(f"Saved the full model to {self.out} (Hugging Face directory: config.json, model.safetensors)"
                      if cfg.fine_tune_type == "full" else
                      f"Saved adapter to {self.out} (PEFT layout: adapter_config.json, adapter_model.safetensors)")
        return self.out

    def _start(self, iters: int) -> tuple:
        """(position, notices, checkpoint contents or None), with adapter_path ready for this run.

        A fresh run clears an earlier run's checkpoints (so `--resume` cannot pick them up); a
        resumed one is first checked against the checkpoint, then the directory is rewound to it."""
        self.fingerprint = resume.fingerprint(self.cfg, self.model_path, self.splits["train"])
        pos, notes, restored = Position(), [], None
        if self.checkpoint:
            restored = resume.read_checkpoint(self.checkpoint)
            notes += resume.check_compatible(self.checkpoint, restored[0]["fingerprint"], self.fingerprint)
            pos = Position(**restored[0]["position"])
            if pos.step >= iters:
                raise UserError(f"{self.checkpoint}: the run already reached step {pos.step} of iters {iters}; "
                                "raise iters to train further")
        self.out.mkdir(parents=True, exist_ok=True)
        notes += resume.rewind(self.out, pos.step) if self.checkpoint else [resume.clear_stale(self.out)]
        save_config(replace(self.cfg, resume=False, resume_from=None), self.out / CONFIG_FILE)
        return pos, notes, restored

    def _guarded(self, fn, *args):
        """Run a backend call; an allocation failure becomes a UserError naming the knobs."""
        try:
            return fn(*args)
        except (RuntimeError, MemoryError) as err:
            if not guards.is_out_of_memory(err):
                raise
            est = getattr(self, "estimate", None)
            raise guards.out_of_memory(err, self.cfg, self.longest, f"~{est.total / 1e9:.3g} GB" if est else None) from None

    def _restore(self, state: dict, optimizer: dict, rng: dict) -> list:
        """Weights, optimizer moments and RNG from a checkpoint (its position is set by the caller)."""
        if self.cfg.fine_tune_type != "full":  # full fine-tunes were loaded from the checkpoint dir
            _, weights = load_adapter(self.checkpoint)
            self.backend.set_adapter_weights(weights)
        self.backend.load_optimizer_state(optimizer)
        resume.set_numpy_rng_state(rng)
        if state.get("backend") != self.backend.name:
            return [f"checkpoint written by the {state.get('backend')} backend: its random state does not carry over "
                    "(only dropout draws differ)"]
        self.backend.set_rng_state(rng)
        return []

    def _interrupted(self, pos: Position) -> None:
        """Ctrl-C: keep the progress as a checkpoint, say how to continue, exit with status 130."""
        import click

        if pos.step > self._saved_step:
            self.save_checkpoint(pos)
        if self.last_checkpoint is None:
            click.echo("Interrupted before the first step: nothing to save.", err=True)
        else:
            click.echo(f"Interrupted at step {pos.step}: saved checkpoint {self.last_checkpoint}. Resume with: "
                       f"mlxft lora --config {self.out / CONFIG_FILE} --resume (or your command plus --resume)",
                       err=True)
        raise KeyboardInterrupt

    def save_adapter(self, out_dir: Path) -> None:
        if self.cfg.fine_tune_type == "full":  # no adapter: the directory holds the whole model
            from mlxft.adapters.files import save_full_model

            return save_full_model(out_dir, self.backend.model_weights(), self.model_path, self.backend.dtype)
        save_adapter(out_dir, self.backend.adapter_weights(), adapter_config(self.plan, self.cfg.model))

    def save_checkpoint(self, pos: Position) -> Path:
        """checkpoints/step-NNNNNNN: weights, config, optimizer state, RNG, data position."""
        self.last_checkpoint = resume.write_checkpoint(self.out, pos, self.save_adapter, self.cfg, self.backend,
                                                       self.fingerprint, self.cfg.keep_checkpoints)
        self._saved_step = pos.step
        return self.last_checkpoint

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


def plan(cfg: Config) -> list:
    """`mlxft lora --dry-run`: the memory plan from config, data and model metadata; writes nothing,
    loads no weights."""
    if cfg.train:
        check_writable(Path(cfg.adapter_path))
    resume.find_checkpoint(cfg)
    model_path = resolve_model(cfg.model, cfg.revision)
    splits = load_splits(cfg, load_tokenizer(model_path, cfg))
    longest = max(len(s) for s in splits["train"].sequences)
    batches = epoch_batches(splits["train"], cfg.batch_size, seed=cfg.seed, epoch=0, pad_id=0)
    lines = [f"Data train: {len(splits['train'])} examples, longest {longest} tokens, {len(batches)} batches per epoch, "
             f"{total_iters(cfg, len(batches))} steps"]
    return lines + planner.plan_lines(cfg, model_path, longest)
