"""The fine-tuning recipe: config -> data -> batches -> backend step -> metrics -> adapter files.

One loop for both backends (the backend owns only tensor work).  `Session` loads a model,
its tokenizer and data once; `steps()` runs optimizer steps and yields what each did (the
benchmark worker times exactly these); `train()` wraps them with validation, reports,
checkpoints and guards, and returns a `TrainResult`.  Validation runs before the first update,
every `steps_per_eval`, at the end (and at each epoch's end with `eval_every_epoch`); with
`eval_prompts` it also generates samples, and `mlxft.training.early_stopping` may end the run
there and keeps the best adapter.  Checkpoints (`mlxft.training.checkpoint`) let
`--resume` continue a killed run exactly; `mlxft.training.guards` stops it cleanly on a
diverged loss, out of memory or Ctrl-C.

Under `mlx.launch` or `torchrun` every rank runs this same loop on its share of each batch
(`mlxft.training.world`); the backend returns sums over the world, so the loop only has to
leave the files (metrics, checkpoints, adapter) and the console to rank 0.

Preference tuning (train_mode dpo/orpo) is this same loop on pair batches
(`mlxft.data.preference`): the step is the backend's `preference_step`, validation reports
TRL's reward metrics, and `mlxft.training.preference` adds the DPO reference log-prob cache.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from mlxft.adapters import plan_adapters
from mlxft.adapters.files import adapter_config, load_adapter, save_adapter, save_full_model
from mlxft.adapters.targets import full_layers
from mlxft.backends import get_backend
from mlxft.config import CONFIG_FILE, Config, save_config, total_iters
from mlxft.data import Split, epoch_batches, eval_batches, padding_fraction
from mlxft.data.preference import pair_epoch_batches, pair_eval_batches
from mlxft.errors import UserError
from mlxft.model_dir import check_model_dir, read_model_config
from mlxft.training import checkpoint, guards, planner, preference, run_dir
from mlxft.training.checkpoint import Position
from mlxft.training.early_stopping import EarlyStopping, Epochs
from mlxft.training.eval_samples import EvalSamples
from mlxft.training.inputs import read_inputs
from mlxft.training.metrics import METRICS_FILE, Reporter
from mlxft.training.schedule import learning_rate
from mlxft.training.trackers import open_trackers
from mlxft.training.world import World, check_same_start, gather_states


@dataclass
class Step:
    """One optimizer step, as `Session.steps` yields it."""

    step: int  # the step just taken (1-based)
    learning_rate: float
    loss_sum: float  # sum of token losses over the group
    tokens: int  # trained (target) tokens
    positions: int  # batch positions processed, padding included
    grad_norm: float
    seconds: float
    weights_finite: bool = True  # the weights and optimizer state after the update
    comm_seconds: float = 0.0  # of `seconds`, in collectives (waiting for other ranks included)
    sums: dict | None = None  # preference tuning: the step's sums (mlxft.training.preference)
    objective: float | None = None  # preference tuning: the group's loss (not per token)

    @property
    def loss(self) -> float:
        if self.objective is not None:
            return self.objective
        return self.loss_sum / max(self.tokens, 1)


@dataclass
class TrainResult:
    """What `Session.train` leaves behind."""

    adapter_path: Path
    steps: int
    trained_tokens: int
    first_val_loss: float | None  # before the first update (None when resumed)
    last_val_loss: float | None


def batch_stream(
    split: Split, cfg: Config, pad_id: int, pos: Position, make=epoch_batches
) -> Iterator:
    """Training batches forever, epoch after epoch, advancing `pos` (what checkpoints record);
    `make` builds an epoch (`pair_epoch_batches` for preference pairs)."""
    while True:
        batches = make(split, cfg.batch_size, seed=cfg.seed, epoch=pos.epoch, pad_id=pad_id)
        while pos.index < len(batches):
            batch = batches[pos.index]
            pos.index += 1
            yield batch
        pos.epoch, pos.index = pos.epoch + 1, 0


class Session:
    """A model + tokenizer + data, loaded once; train() and test() work on it."""

    def __init__(self, cfg: Config, reporter_quiet: bool = False, world: World | None = None):
        self.cfg = cfg
        self.world = world or World()
        self.quiet = reporter_quiet or not self.world.is_main
        self.out = Path(cfg.adapter_path)
        inputs = read_inputs(cfg, writes=self.world.is_main)
        self.model_path = inputs.model_path
        self.tokenizer = inputs.tokenizer
        self.splits = inputs.splits
        self.pad_id = inputs.pad_id
        self.checkpoint = inputs.checkpoint
        self.spec = preference.PreferenceSpec.of(cfg)  # None: supervised fine-tuning
        self.epoch_batches = pair_epoch_batches if self.spec else epoch_batches
        self.eval_batches = pair_eval_batches if self.spec else eval_batches
        self.backend = get_backend(cfg, self.world)
        full_resume = self.checkpoint is not None and cfg.fine_tune_type == "full"
        # a full fine-tune's checkpoint is a whole model directory
        if full_resume:
            check_model_dir(self.checkpoint)
        self.backend.load(self.checkpoint if full_resume else self.model_path)
        self.plan = None
        if cfg.fine_tune_type != "full":
            self.plan = plan_adapters(self.backend.linear_modules(), self.backend.num_blocks(), cfg)
            self.backend.add_adapters(self.plan)
        start = cfg.resume_adapter_file or (None if cfg.train else cfg.adapter_path)
        if start:
            start = Path(start)
            _, weights = load_adapter(start.parent if start.is_file() else start)
            self.backend.set_adapter_weights(weights)
        # set by train()
        self.longest = max(len(s) for s in self.splits["train"].sequences)
        self.estimate: planner.Estimate | None = None
        self.fingerprint: dict | None = None
        self.last_checkpoint: Path | None = self.checkpoint  # the newest written
        self.last_good: Path | None = self.checkpoint  # the newest seen to compute a finite loss
        self.pending: Path | None = None  # written, its weights not yet seen by a step
        self.saved_step = 0
        self.vocab_size = _vocab_size(self.model_path)
        self._stall_warned = False
        self.first_val_loss: float | None = None
        self.last_val_loss: float | None = None
        self.monitor: EarlyStopping | None = None
        self.samples: EvalSamples | None = None
        self.stopped = False  # the ranks agreed to stop early (Ctrl-C)
        self.tracker_ids: dict = {}  # {tracker: run id} (report_to), kept in checkpoints
        self.test_report: dict | None = None  # preference tuning: TRL's metrics of test()

    # ------------------------------------------------------------------ header
    def header(self, iters: int, batches_per_epoch: int, pad_frac: float) -> list:
        cfg, b = self.cfg, self.backend
        trainable, total = b.parameter_counts()
        lines = [
            f"Model {cfg.model} ({b.dtype}) on {b.name}:{b.device}",
            *([self.world.describe(b.name, cfg.batch_size)] if self.world.distributed else []),
            f"Trainable parameters: {100 * trainable / max(total, 1):.3f}% "
            f"({trainable / 1e6:.3f}M/{total / 1e6:.3f}M)",
        ]
        if self.plan:
            p = self.plan
            lines.append(
                f"{p.kind.upper()}: rank {p.rank}, scale {p.scale:g} (alpha {p.scale * p.rank:g}), "
                f"dropout {p.dropout:g}, {len(p.targets)} modules ({', '.join(p.module_names)}) "
                f"in layers {p.layers[0]}-{p.layers[-1]} of {p.num_blocks}"
            )
        else:
            blocks, everything = full_layers(b.num_blocks(), cfg.num_layers)
            scope = (
                "all weights"
                if everything
                else f"blocks {blocks[0]}-{blocks[-1]} of {b.num_blocks()} (embeddings frozen)"
            )
            lines.append(f"FULL fine-tune: {scope}")
        limit = "max_prompt_length/max_seq_length" if self.spec else f"{cfg.max_seq_length} tokens"
        for name, split in self.splits.items():
            extra = f", {split.truncated} truncated to {limit}" if split.truncated else ""
            extra += f", {split.dropped} dropped (no target tokens left)" if split.dropped else ""
            unit = "pairs" if self.spec else "examples"
            lines.append(
                f"Data {name}: {len(split)} {unit} ({split.format}) from {split.source}{extra}"
            )
        if self.spec:
            lines.append(preference.header_line(cfg, self.spec))
        epochs = iters * cfg.grad_accumulation_steps / max(1, batches_per_epoch)
        rows = "pairs (chosen + rejected rows in one batch)" if self.spec else "sequences"
        lines.append(
            f"Training {iters} steps (~{epochs:.2f} epochs) of "
            f"{cfg.grad_accumulation_steps}x{cfg.batch_size} {rows}; "
            f"padding {100 * pad_frac:.1f}% of batch positions (length-sorted)"
        )
        return lines

    # ------------------------------------------------------------------ steps
    def steps(self, pos: Position, iters: int, stop=None) -> Iterator[Step]:
        """Optimizer steps from `pos` up to `iters` (or until `stop.requested`), advancing `pos`.
        `setup_training` must have run; nothing is reported or saved here.

        Every rank draws the same global batches and trains on its share; a stop request
        (Ctrl-C) travels with the step's all-reduce, so every rank stops after the same step
        (`self.stopped`).  One process stops before the next step, as it always did."""
        cfg, world, backend = self.cfg, self.world, self.backend
        stream = batch_stream(self.splits["train"], cfg, self.pad_id, pos, self.epoch_batches)
        while pos.step < iters:
            asked = stop is not None and stop.requested
            if asked and not world.distributed:
                self.stopped = True
                return
            lr = learning_rate(pos.step, cfg.learning_rate, cfg.lr_schedule, iters)
            group = [next(stream) for _ in range(cfg.grad_accumulation_steps)]
            world.at(f"step {pos.step + 1}")
            comm, tic = backend.comm_seconds, time.perf_counter()
            shares = [world.share(b) for b in group]  # of pair batches: whole pairs
            if self.spec:
                sums = self._guarded(backend.preference_step, shares, lr, self.spec, asked)
                result = preference.step_result(sums, self.spec)
                objective = preference.summarize(sums, self.spec)["loss"]
            else:
                result = self._guarded(backend.train_step, shares, lr, asked)
                sums = objective = None
            seconds = time.perf_counter() - tic
            pos.step += 1
            pos.trained_tokens += result.tokens
            positions = sum(b.inputs.size for b in group)
            yield Step(
                pos.step,
                lr,
                result.loss_sum,
                result.tokens,
                positions,
                result.grad_norm,
                seconds,
                result.weights_finite,
                backend.comm_seconds - comm,
                sums,
                objective,
            )
            if result.stop:
                self.stopped = True
                return

    # ------------------------------------------------------------------ train
    def train(self) -> TrainResult:
        """Every check first (config, data, model, checkpoint, optimizer, restored state), then
        the run directory: locked, an earlier run moved aside or a resumed one rewound, and only
        then written to.  A run that fails before its first step leaves adapter_path as it was."""
        cfg, backend = self.cfg, self.backend
        first_epoch = self.epoch_batches(
            self.splits["train"], cfg.batch_size, seed=cfg.seed, epoch=0, pad_id=self.pad_id
        )
        iters = total_iters(cfg, len(first_epoch))
        val = self.eval_batches(self.splits["valid"], cfg.batch_size, self.pad_id, cfg.val_batches)
        val = [self.world.share(b) for b in val]
        main = self.world.is_main
        self.samples = self._eval_samples() if main else None  # checked before any write
        pos, notes, restored = self._plan_start(iters)
        self.monitor = EarlyStopping(
            cfg.early_stopping_patience, cfg.early_stopping_min_delta, cfg.save_best, self.out
        )
        notes.append(self.monitor.describe())
        reporter = Reporter(None, iters, quiet=self.quiet, start_step=pos.step)
        rows = cfg.batch_size * (2 if self.spec else 1)  # a pair batch holds both answers
        per_rank = replace(cfg, batch_size=rows // self.world.size)  # what one rank holds
        memory, self.estimate = planner.header_line(per_rank, self.model_path, self.longest)
        header = self.header(iters, len(first_epoch), padding_fraction(first_epoch))
        for line in [*header, memory]:
            reporter.echo(line)
        backend.setup_training(cfg)
        notes += backend.training_notes
        if restored:
            notes += self._restore(*restored)
            notes.append(
                f"Resuming from {self.checkpoint} at step {pos.step} "
                f"(epoch {pos.epoch}, batch {pos.index})"
            )
        if self.spec:
            notes += preference.attach_reference(self, self.spec)
            val = self.eval_batches(  # now with the cached reference log-probs, if any
                self.splits["valid"], cfg.batch_size, self.pad_id, cfg.val_batches
            )
            val = [self.world.share(b) for b in val]
        early = restored[0].get("early_stopping") if restored else None
        # rank 0 owns adapter_path: the lock, the directory, every file; the others compute
        with run_dir.RunLock(self.out) if main else contextlib.nullcontext() as lock:
            if main:
                notes = lock.notes + self._prepare(pos, restored) + notes
                self.monitor.start(self.checkpoint, early)
                trackers, self.tracker_ids, tracker_notes = open_trackers(
                    cfg, self.out, (restored[0].get("trackers") or {}) if restored else {}, pos.step
                )
                notes += tracker_notes
                reporter.open(self.out / METRICS_FILE, trackers)
            else:
                self.monitor.load_state(early)
            try:
                for note in filter(None, notes):
                    reporter.echo(note)
                check_same_start(self.world, backend, pos, self.fingerprint)
                self._run(pos, iters, val, reporter, Epochs(len(first_epoch)))
                if main:
                    self.save_adapter(self.out)
            except BaseException:
                reporter.close()  # the trackers record a run that stopped early
                raise
            reporter.close(self.out)  # the trackers get the adapter as the run's artifact
        reporter.echo(
            f"Saved the full model to {self.out} (Hugging Face directory: config.json, "
            f"model.safetensors)"
            if cfg.fine_tune_type == "full"
            else f"Saved adapter to {self.out} "
            "(PEFT layout: adapter_config.json, adapter_model.safetensors)"
        )
        return TrainResult(
            self.out, pos.step, pos.trained_tokens, self.first_val_loss, self.last_val_loss
        )

    def _run(
        self, pos: Position, iters: int, val: list, reporter: Reporter, epochs: Epochs
    ) -> None:
        """Validation, steps, reports and checkpoints from `pos` to `iters` (or Ctrl-C, or
        early stopping)."""
        cfg, backend, monitor, samples = self.cfg, self.backend, self.monitor, self.samples
        backend.reset_peak_memory()
        window = Window()
        self.saved_step = pos.step

        def evaluate(step: int) -> float:
            self.world.at(f"validation at step {step}")
            tic = time.perf_counter()
            loss, count, extra = self._evaluate(val)
            lr = learning_rate(min(step, iters - 1), cfg.learning_rate, cfg.lr_schedule, iters)
            its, tps = window.run_rates(pos.step)
            guards.check_evaluation(step, loss, lr, cfg, self.last_good)
            seconds = time.perf_counter() - tic
            reporter.evaluation(
                step,
                "val",
                loss,
                count,
                seconds,
                lr,
                its,
                tps,
                pos.trained_tokens,
                backend.peak_memory_gb(),
                samples.run(backend) if samples else None,
                extra,
            )
            # every rank keeps the same early-stopping state; rank 0 writes best/
            monitor.update(step, loss, self.save_adapter if self.world.is_main else _no_write)
            return loss

        with guards.StopRequest(self.world.distributed, speak=self.world.is_main) as stop:
            if not self.checkpoint:
                self.first_val_loss = evaluate(0)
            epochs_done = epochs.completed(pos)
            for step in self.steps(pos, iters, stop):
                self._settle_pending(step.loss, reporter)
                guards.check_step(step, cfg, self.last_good)
                self._warn_if_stalled(step)
                window.add(step)
                reporter.progress(step.step, step.loss, window.run_rates(step.step)[1])
                if step.step % cfg.steps_per_report == 0 or step.step == iters:
                    extra = preference.summarize(window.sums, self.spec) if self.spec else None
                    reporter.train(
                        step.step,
                        extra.pop("loss") if extra else window.loss,
                        step.learning_rate,
                        window.its,
                        window.tps,
                        pos.trained_tokens,
                        backend.peak_memory_gb(),
                        step.grad_norm,
                        extra,
                    )
                    window.reset()
                evaluated = step.step % cfg.steps_per_eval == 0 or step.step == iters
                if evaluated:
                    self.last_val_loss = evaluate(step.step)
                epoch, epochs_done = epochs.ended(epochs_done, pos), epochs.completed(pos)
                if epoch:
                    reporter.echo(f"Epoch {epoch} done at step {step.step}")
                    if cfg.eval_every_epoch and not evaluated:
                        self.last_val_loss = evaluate(step.step)
                if monitor.stopped:
                    reporter.echo(monitor.reason(step.step))
                    break
                if step.step % cfg.save_every == 0 and step.step != iters:
                    self.save_checkpoint(pos)
            if self.stopped and pos.step < iters:
                self._interrupted(pos)

    def _evaluate(self, batches: list) -> tuple:
        """(loss, count, TRL metrics or None) over `batches`, no update: the mean token loss
        over tokens (SFT), or the preference objective over pairs (`summarize`)."""
        if self.spec is None:
            total, count = self._guarded(self.backend.eval_loss, batches)
            return total / max(count, 1), count, None
        sums = preference.evaluate(self._guarded, self.backend, batches, self.spec)
        report = preference.summarize(sums, self.spec)
        return report.pop("loss"), int(sums.get("pairs", 0)), report

    def _eval_samples(self) -> EvalSamples | None:
        """eval_prompts, tokenized and checked against the context window (None when unset)."""
        if not self.cfg.eval_prompts:
            return None
        fmt = self.splits["train"].format
        fmt = preference.SFT_FORMAT.get(fmt, fmt)  # preference prompts render as SFT prompts
        return EvalSamples(self.cfg, self.tokenizer, self.model_path, fmt)

    def _plan_start(self, iters: int) -> tuple:
        """(position, notices, checkpoint contents or None), reading only: a resumed run is
        checked against its checkpoint here, before anything is written."""
        self.fingerprint = checkpoint.fingerprint(self.cfg, self.model_path, self.splits["train"])
        pos, notes, restored = Position(), [], None
        if self.checkpoint:
            restored = checkpoint.read_checkpoint(self.checkpoint)
            saved = restored[0]["fingerprint"]
            notes += checkpoint.check_compatible(self.checkpoint, saved, self.fingerprint)
            pos = Position(**restored[0]["position"])
            if pos.step >= iters:
                raise UserError(
                    f"{self.checkpoint}: the run already reached step {pos.step} of iters {iters}; "
                    "raise iters to train further"
                )
        return pos, notes, restored

    def _prepare(self, pos: Position, restored) -> list:
        """With the lock held: sweep a killed writer's temporaries, then rewind the directory to
        the resumed checkpoint, or move an earlier run aside; write this run's config."""
        notes = []
        swept = run_dir.sweep(self.out)
        if swept:
            notes.append(f"removed {swept} temporary file(s) an interrupted run left in {self.out}")
        if self.checkpoint:
            self._check_unchanged(restored[0])
            notes += checkpoint.rewind(self.out, pos.step)
        else:  # a full fine-tune of the model in adapter_path itself still reads its files
            in_place = self.model_path.resolve() == self.out.resolve()
            notes.append(run_dir.move_aside(self.out, model_files=not in_place))
        save_config(replace(self.cfg, resume=False, resume_from=None), self.out / CONFIG_FILE)
        return notes

    def _check_unchanged(self, state: dict) -> None:
        """The checkpoint read before the lock was taken is still the one on disk."""
        try:
            now = json.loads((self.checkpoint / checkpoint.STATE_JSON).read_text())
        except (OSError, ValueError):
            now = None
        if now != state:
            raise UserError(
                f"{self.checkpoint}: changed while this run was starting (another run wrote to "
                f"{self.out}); run the command again"
            )

    def _settle_pending(self, loss: float, reporter: Reporter) -> None:
        """A step's loss is computed with the weights the previous step left, so it decides on
        the checkpoint written just before it: finite, the checkpoint is good (and older ones
        are pruned); not finite, it holds diverged weights and is removed."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        main = self.world.is_main
        if math.isfinite(loss):
            self.last_good = pending
            if main:
                checkpoint.prune(self.out, self.cfg.keep_checkpoints)
            return
        if main:
            checkpoint.discard(pending)
        self.last_checkpoint = self.last_good
        reporter.echo(f"Removed checkpoint {pending}: its weights compute a non-finite loss")

    def _warn_if_stalled(self, step: Step) -> None:
        if self._stall_warned or self.spec:  # a preference loss is not a token cross-entropy
            return
        message = guards.collapsed(step.loss, step.grad_norm, self.vocab_size)
        if message:
            self._stall_warned = True
            warnings.warn(f"step {step.step}: {message}", UserWarning, stacklevel=2)

    def _guarded(self, fn, *args):
        """Run a backend call; an allocation failure becomes a UserError naming the knobs."""
        try:
            return fn(*args)
        except (RuntimeError, MemoryError) as err:
            if not guards.is_out_of_memory(err):
                raise
            est = self.estimate
            planned = f"~{est.total / 1e9:.3g} GB" if est else None
            raise guards.out_of_memory(err, self.cfg, self.longest, planned) from None

    def _restore(self, state: dict, optimizer: dict, rng: dict) -> list:
        """Weights, optimizer moments and RNG from a checkpoint (its position is set by the
        caller).  Each rank takes its own saved RNG stream (`checkpoint.rank_rng`)."""
        if self.cfg.fine_tune_type != "full":  # full fine-tunes were loaded from the checkpoint dir
            _, weights = load_adapter(
                self.checkpoint,
                fix="resume from an earlier checkpoint with --resume-from, or start over "
                "without --resume",
            )
            self.backend.set_adapter_weights(weights)
        self.backend.load_optimizer_state(optimizer)
        checkpoint.set_numpy_rng_state(rng)
        if state.get("backend") != self.backend.name:
            return [
                f"checkpoint written by the {state.get('backend')} backend: its random state does "
                "not carry over (only dropout draws differ)"
            ]
        own = checkpoint.rank_rng(rng, self.world.rank)
        saved_size = state.get("world_size", 1)
        if own:
            self.backend.set_rng_state(own)
        if saved_size != self.world.size:
            return [
                f"checkpoint written by {saved_size} process(es), resumed on {self.world.size}: "
                "the data position is global, so only dropout draws differ"
            ]
        return []

    def _interrupted(self, pos: Position) -> None:
        """Ctrl-C: keep the progress as a checkpoint, say how to continue, exit with status 130."""
        import click

        if pos.step > self.saved_step:
            self.save_checkpoint(pos)
            if self.world.is_main:
                checkpoint.prune(self.out, self.cfg.keep_checkpoints, also_keep=self.last_good)
        if not self.world.is_main:
            raise KeyboardInterrupt
        if self.last_checkpoint is None:
            click.echo("Interrupted before the first step: nothing to save.", err=True)
        else:
            click.echo(
                f"Interrupted at step {pos.step}: saved checkpoint {self.last_checkpoint}. "
                f"Resume with: mlxft lora --config {self.out / CONFIG_FILE} --resume "
                "(or your command plus --resume)",
                err=True,
            )
        raise KeyboardInterrupt

    def save_adapter(self, out_dir: Path) -> None:
        if self.cfg.fine_tune_type == "full":  # no adapter: the directory holds the whole model
            weights = self.backend.model_weights()
            save_full_model(out_dir, weights, self.model_path, self.backend.dtype)
            return
        quantization = {"quantize": self.cfg.quantize, "q_group_size": self.cfg.q_group_size}
        save_adapter(
            out_dir,
            self.backend.adapter_weights(),
            adapter_config(self.plan, self.cfg.model),
            quantization,
        )

    def save_checkpoint(self, pos: Position) -> Path:
        """checkpoints/step-NNNNNNN: weights, config, optimizer state, RNG, data position; best/
        and the early-stopping state travel with it, so a resumed run continues both exactly.
        Every rank takes part (each rank's RNG state is gathered); rank 0 writes."""
        self.world.at(f"checkpoint at step {pos.step}")
        states = gather_states(self.world, self.backend, self.backend.rng_state())
        if not self.world.is_main:
            self.last_checkpoint = self.out / checkpoint.CHECKPOINTS / f"step-{pos.step:07d}"
            self.pending = self.last_checkpoint
            self.saved_step = pos.step
            return self.last_checkpoint
        monitor = self.monitor

        def save(tmp: Path) -> None:
            self.save_adapter(tmp)
            if self.spec:
                preference.save_reference(tmp, self.splits)
            if monitor is not None:
                monitor.attach(tmp)

        self.last_checkpoint = checkpoint.write_checkpoint(
            self.out,
            pos,
            save,
            self.cfg,
            self.backend,
            self.fingerprint,
            {
                **({"early_stopping": monitor.state()} if monitor else {}),
                "trackers": self.tracker_ids,  # a resumed run continues the same tracker runs
            },
            rank_states=states,
        )
        self.pending = self.last_checkpoint
        self.saved_step = pos.step
        return self.last_checkpoint

    # ------------------------------------------------------------------ test
    def test(self) -> float:
        if "test" not in self.splits:
            where = self.cfg.data or "hf_dataset (set its test_split)"
            raise UserError(f"{where}: no test.jsonl for --test")
        batches = self.eval_batches(
            self.splits["test"], self.cfg.batch_size, self.pad_id, self.cfg.test_batches
        )
        loss, _, extra = self._evaluate([self.world.share(b) for b in batches])
        if not self.quiet:
            if extra:
                print(
                    f"Test loss {loss:.3f}, reward accuracy {extra['rewards/accuracies']:.3f}, "
                    f"margin {extra['rewards/margins']:.3f}."
                )
            else:
                print(f"Test loss {loss:.3f}, Test ppl {math.exp(min(loss, 700)):.3f}.")
        self.test_report = extra
        return loss


def _vocab_size(model_path: Path) -> int | None:
    """The output layer's width (config.json), for the stalled-at-uniform warning."""
    config = read_model_config(model_path)
    value = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return value if isinstance(value, int) else None


class Window:
    """Sums over the steps since the last report, and over the whole run, for the rates."""

    def __init__(self):
        self.reset()
        self.run_steps, self.run_tokens, self.run_seconds = 0, 0, 0.0

    def reset(self) -> None:
        self.loss_sum, self.tokens, self.steps, self.seconds = 0.0, 0, 0, 0.0
        self.sums: dict = {}  # preference tuning's sums (mlxft.training.preference)

    def add(self, step: Step) -> None:
        if step.sums is not None:
            preference.add(self.sums, step.sums)
        self.loss_sum += step.loss_sum
        self.tokens += step.tokens
        self.steps += 1
        self.seconds += step.seconds
        self.run_steps += 1
        self.run_tokens += step.tokens
        self.run_seconds += step.seconds

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)

    @property
    def its(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def run_rates(self, step: int) -> tuple:
        """(iterations/s, tokens/s) over this process's steps, as validation rows report them."""
        if not self.run_seconds:
            return 0.0, 0.0
        return step / self.run_seconds, self.run_tokens / self.run_seconds


def _no_write(_path: Path) -> None:
    """What a rank other than 0 writes: nothing (rank 0 owns adapter_path)."""
