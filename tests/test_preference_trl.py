"""DPO and ORPO against TRL (the reference implementation), then MLX against torch.

TRL's own trainers run as the oracle: `trl.DPOTrainer` and `trl.experimental.orpo.ORPOTrainer`
on a tiny fp32 llama with a PEFT LoRA adapter, starting from the same adapter weights as ours
(random A and B, so the policy differs from the reference from step 1), on the same pairs in
the same batch order (a sequential sampler over the pairs listed in our batch order), AdamW with
the same settings, no dropout.  TRL tokenizes the string records itself, and the tokens must
equal ours.  Step 1: loss, rewards, log-probs and every adapter gradient within 1e-5; 10
steps: per-step loss and metrics within 1e-4 (torch); MLX within 1e-4 of torch.  Three modes:
dpo, orpo, and rpo (DPO with `rpo_alpha`: TRL's loss_type [sigmoid, sft], loss_weights [1, a]).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from mlxft.config import build_config  # noqa: E402
from mlxft.data.preference import load_preference_splits, pair_epoch_batches  # noqa: E402
from mlxft.hub import load_tokenizer  # noqa: E402
from mlxft.training.preference import PreferenceSpec, summarize  # noqa: E402
from mlxft.training.session import Session  # noqa: E402
from tests.conftest import REPO  # noqa: E402

PAIRS = REPO / "examples" / "data" / "wikisql_dpo" / "train.jsonl"
KEYS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, LR, STEPS, BATCH = 4, 8.0, 5e-3, 10, 2
RPO_ALPHA = 0.5
METRICS = {
    "dpo": [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ],
    "orpo": [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "nll_loss",
        "log_odds_ratio",
        "log_odds_chosen",
    ],
}
METRICS["rpo"] = METRICS["dpo"]  # TRL logs no separate sft term


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


def _short(line: str) -> str:
    """A shipped WikiSQL pair cut to the question and the SELECT clause.  Short answers keep the
    summed log-probs small: with ~400-nat sums, float32 rounding alone (3e-5) would exceed the
    1e-5 the comparison asks for, on either side."""
    pair = json.loads(line)
    question = pair["prompt"].split("\nQ: ", 1)[1]
    return json.dumps(
        {
            "prompt": "Q: " + question,
            "chosen": pair["chosen"].split(" FROM ")[0],
            "rejected": pair["rejected"].split(" FROM ")[0],
        }
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """20 WikiSQL pairs (train) and 4 (valid), cut short; pairs whose cut sides coincide are
    skipped."""
    out = tmp_path_factory.mktemp("pref_data")
    lines = [
        s
        for s in map(_short, PAIRS.read_text().splitlines())
        if json.loads(s)["chosen"] != json.loads(s)["rejected"]
    ]
    (out / "train.jsonl").write_text("\n".join(lines[: STEPS * BATCH]) + "\n")
    (out / "valid.jsonl").write_text("\n".join(lines[100:104]) + "\n")
    return out


def _config(model, data, out, mode, backend="torch", **extra):
    if mode == "rpo":
        mode, extra = "dpo", {"rpo_alpha": RPO_ALPHA, **extra}
    values = dict(
        model=str(model),
        data=str(data),
        adapter_path=str(out),
        train=True,
        iters=STEPS,
        batch_size=BATCH,
        max_seq_length=1024,
        learning_rate=LR,
        num_layers=-1,
        steps_per_report=1,
        steps_per_eval=1000,
        val_batches=1,
        save_every=1000,
        seed=0,
        train_mode=mode,
        beta=0.2,
        use_chat_template="false",
        backend=backend,
    )
    values.update(extra)
    return build_config(
        overrides=values,
        lora_overrides={"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "keys": KEYS},
    )


def _start_weights(tiny_llama, data, tmp_path_factory) -> dict:
    """A random adapter (B != 0), the same for TRL and both our backends."""
    session = Session(_config(tiny_llama, data, tmp_path_factory.mktemp("w"), "dpo"))
    rng = np.random.default_rng(7)
    return {
        k: (rng.standard_normal(v.shape) * 0.05).astype(np.float32)
        for k, v in session.backend.adapter_weights().items()
    }


@pytest.fixture(scope="module")
def weights(tiny_llama, data, tmp_path_factory):
    return _start_weights(tiny_llama, data, tmp_path_factory)


def _order(cfg) -> list:
    """The pair indices in the order our trainer meets them (epoch 0)."""
    split = load_preference_splits(cfg, load_tokenizer(cfg.model, cfg))["train"]
    return [
        int(i)
        for b in pair_epoch_batches(split, BATCH, seed=cfg.seed, epoch=0, pad_id=0)
        for i in b.pairs
    ]


# ---------------------------------------------------------------------------- TRL
def _trl_run(
    mode: str,
    model_dir,
    data,
    weights: dict,
    order: list,
    out,
    steps: int = STEPS,
    swap: bool = False,
) -> dict:
    """TRL's trainer for `steps` steps: per-step loss + metrics, step-1 gradients, its tokens
    (`swap`: every pair's chosen and rejected exchanged)."""
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    if swap:
        records = [dict(r, chosen=r["rejected"], rejected=r["chosen"]) for r in records]
    dataset = Dataset.from_list([records[i] for i in order])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lora = LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=KEYS, task_type="CAUSAL_LM"
    )
    common = dict(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        beta=0.2,
        disable_dropout=True,
        seed=0,
        dataloader_num_workers=0,
    )
    seen = {"steps": [], "grads": None}
    if mode == "dpo":
        base, config = trl.DPOTrainer, trl.DPOConfig(max_length=None, **common)
    elif mode == "rpo":
        losses = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, RPO_ALPHA])
        base, config = trl.DPOTrainer, trl.DPOConfig(max_length=None, **losses, **common)
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        base, config = ORPOTrainer, ORPOConfig(max_length=4096, **common)

    class Recording(base):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def training_step(self, *args, **kwargs):
            out = super().training_step(*args, **kwargs)
            if seen["grads"] is None:
                seen["grads"] = {
                    n: p.grad.detach().clone()
                    for n, p in self.model.named_parameters()
                    if p.grad is not None
                }
            return out

        if mode != "orpo":

            def _compute_loss(self, model, inputs, return_outputs):
                loss = super()._compute_loss(model, inputs, return_outputs)
                if model.training:
                    seen["steps"].append(
                        {
                            "loss": loss.item(),
                            **{k: v[-1] for k, v in self._metrics["train"].items()},
                        }
                    )
                return loss
        else:

            def get_batch_loss_metrics(self, model, batch, train_eval="train"):
                loss, metrics = super().get_batch_loss_metrics(model, batch, train_eval)
                if train_eval == "train":
                    seen["steps"].append({"loss": loss.item(), **metrics})
                return loss, metrics

    trainer = Recording(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
    )
    state = {
        k.replace("base_model.model.", "base_model.model.", 1): torch.tensor(v)
        for k, v in weights.items()
    }
    result = set_peft_model_state_dict(trainer.model, state)
    assert not result.unexpected_keys
    trainer.train()
    return {"steps": seen["steps"], "grads": seen["grads"], "dataset": trainer.train_dataset}


# ---------------------------------------------------------------------------- ours
def _ours(mode: str, backend: str, model_dir, data, weights: dict, out) -> dict:
    """Our trainer: step-1 gradients (one group, learning rate 0), then STEPS steps via Session."""
    cfg = _config(model_dir, data, out, mode, backend=backend)
    session = Session(cfg, reporter_quiet=True)
    session.backend.set_adapter_weights(weights)
    session.backend.setup_training(cfg)
    first = pair_epoch_batches(
        session.splits["train"], BATCH, seed=0, epoch=0, pad_id=session.pad_id
    )[0]
    grads, spec = _first_gradients(session.backend, [first], PreferenceSpec.of(cfg))
    shutil.rmtree(out, ignore_errors=True)
    session = Session(cfg, reporter_quiet=True)
    session.backend.set_adapter_weights(weights)
    session.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "grads": grads,
        "steps": [r for r in rows if "train_loss" in r],
        "session": session,
        "first": first,
        "step1": spec,
    }


def _first_gradients(backend, batches: list, spec) -> tuple:
    """{PEFT key: gradient} of one group, and its summarized metrics (lr 0: no update)."""
    if backend.name == "torch":
        sums = backend.preference_step(batches, 0.0, spec)
        grads = {k: p.grad.detach().numpy().copy() for k, p in backend._named_trainable()}
        return grads, summarize(sums, spec)
    from mlx.utils import tree_flatten

    from mlxft.adapters.files import peft_key

    captured = {}
    apply = backend._apply

    def capture(acc, count):
        captured.update(tree_flatten(acc))
        return apply(acc, count)

    backend._apply = capture
    try:
        sums = backend.preference_step(batches, 0.0, spec)
    finally:
        backend._apply = apply
    grads = {}
    for name, g in captured.items():
        module, leaf = name.rsplit(".", 1)
        grads[peft_key(module, leaf)] = np.array(g)
    return grads, summarize(sums, spec)


def _trl_key(name: str) -> str:
    """PEFT's parameter name -> the adapter file key ours use (no adapter name)."""
    return name.replace(".default.", ".")


@pytest.fixture(scope="module", params=["dpo", "orpo", "rpo"])
def runs(request, tiny_llama, data, weights, tmp_path_factory):
    mode = request.param
    cfg = _config(tiny_llama, data, tmp_path_factory.mktemp("o"), mode)
    order = _order(cfg)
    out = {"mode": mode, "order": order}
    out["trl"] = _trl_run(
        mode, tiny_llama, data, weights, order, tmp_path_factory.mktemp(f"trl-{mode}")
    )
    for backend in ("torch", "mlx"):
        folder = tmp_path_factory.mktemp(f"{backend}-{mode}")
        out[backend] = _ours(mode, backend, tiny_llama, data, weights, folder)
    return out


def test_tokens_equal_trls(runs):
    """TRL tokenized the string records itself: the same prompt and answer tokens as ours."""
    split = runs["torch"]["session"].splits["train"]
    dataset = runs["trl"]["dataset"]
    for row, pair in zip(dataset, runs["order"]):
        if runs["mode"] != "orpo":
            trl_chosen = row["prompt_ids"] + row["chosen_ids"]
            trl_rejected = row["prompt_ids"] + row["rejected_ids"]
            answer = [0] * len(row["prompt_ids"]) + [1] * len(row["chosen_ids"])
        else:
            trl_chosen, trl_rejected = row["chosen_input_ids"], row["rejected_input_ids"]
            answer = [int(x != -100) for x in row["chosen_labels"]]
        assert list(split.chosen[pair]) == trl_chosen
        assert list(split.rejected[pair]) == trl_rejected
        assert list(split.chosen_masks[pair].astype(int)) == answer


def test_step_one_matches_trl(runs):
    trl_first, ours = runs["trl"]["steps"][0], runs["torch"]["step1"]
    assert ours["loss"] == pytest.approx(trl_first["loss"], abs=1e-5)
    for name in METRICS[runs["mode"]]:
        assert ours[name] == pytest.approx(trl_first[name], abs=1e-5), name
    trl_grads = {_trl_key(k): v.numpy() for k, v in runs["trl"]["grads"].items()}
    ours_grads = runs["torch"]["grads"]
    assert set(ours_grads) == set(trl_grads)
    worst = max(float(np.abs(ours_grads[k] - trl_grads[k]).max()) for k in ours_grads)
    assert worst < 1e-5
    assert (
        max(float(np.abs(g).max()) for g in ours_grads.values()) > 1e-3
    )  # a real gradient, not all zero


def test_ten_steps_match_trl(runs):
    ours, theirs = runs["torch"]["steps"], runs["trl"]["steps"]
    assert len(ours) == len(theirs) == STEPS
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        assert a["train_loss"] == pytest.approx(b["loss"], abs=1e-4), step
        for name in METRICS[runs["mode"]]:
            assert a[name] == pytest.approx(b[name], abs=1e-4), (step, name)


def test_mlx_matches_torch(runs):
    torch_run, mlx_run = runs["torch"], runs["mlx"]
    for name, value in torch_run["step1"].items():
        assert mlx_run["step1"][name] == pytest.approx(value, abs=1e-4), name
    worst = max(float(np.abs(mlx_run["grads"][k] - g).max()) for k, g in torch_run["grads"].items())
    assert worst < 1e-5
    for step, (a, b) in enumerate(zip(mlx_run["steps"], torch_run["steps"]), start=1):
        for name in ["train_loss"] + METRICS[runs["mode"]]:
            assert a[name] == pytest.approx(b[name], abs=1e-4), (step, name)


def test_label_smoothing_is_trls_sigmoid_mixed_with_flipped_labels(
    tiny_llama, data, weights, tmp_path_factory
):
    """Conservative DPO: (1 - e) * TRL's sigmoid loss + e * the same loss with chosen and rejected
    swapped (TRL's sigmoid loss took label_smoothing so up to 0.2x; TRL 1.x keeps it for other
    loss types).  Loss and gradients are linear in the two runs, so TRL checks both."""
    eps = 0.2
    cfg = _config(tiny_llama, data, tmp_path_factory.mktemp("o"), "dpo")
    order = _order(cfg)
    plain = _trl_run("dpo", tiny_llama, data, weights, order, tmp_path_factory.mktemp("a"), steps=1)
    flipped = _trl_run(
        "dpo", tiny_llama, data, weights, order, tmp_path_factory.mktemp("b"), steps=1, swap=True
    )
    out = tmp_path_factory.mktemp("ls")
    cfg = _config(tiny_llama, data, out, "dpo", label_smoothing=eps)
    session = Session(cfg, reporter_quiet=True)
    session.backend.set_adapter_weights(weights)
    session.backend.setup_training(cfg)
    first = pair_epoch_batches(
        session.splits["train"], BATCH, seed=0, epoch=0, pad_id=session.pad_id
    )[0]
    grads, report = _first_gradients(session.backend, [first], PreferenceSpec.of(cfg))
    expected = (1 - eps) * plain["steps"][0]["loss"] + eps * flipped["steps"][0]["loss"]
    assert report["loss"] == pytest.approx(expected, abs=1e-5)
    for name, value in plain["grads"].items():
        mixed = (1 - eps) * value.numpy() + eps * flipped["grads"][name].numpy()
        assert np.abs(grads[_trl_key(name)] - mixed).max() < 1e-5, name
