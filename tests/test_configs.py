"""Every shipped recipe in configs/ runs (a few steps) against a tiny offline model."""

import json
from pathlib import Path

import pytest

from mlxft.config import build_config
from mlxft.train import Session

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs(recipe, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes use repo-relative data paths
    cfg = build_config(str(recipe), {"model": str(tiny_llama), "train": True, "iters": 3, "epochs": None, "steps_per_eval": 3,
                                     "val_batches": 2, "save_every": 2, "adapter_path": str(tmp_path / "out"),
                                     "max_seq_length": 256})
    if recipe.stem == "demo":
        cfg.model = str(REPO / "examples/models/stories260K")
    s = Session(cfg, reporter_quiet=True)
    s.train()
    metrics = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_loss" in m] == [0, 3]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoints" / "step-0000002" / "adapter_model.safetensors").is_file()
    # each recipe exercises what it claims
    if recipe.stem in ("alpaca_chat", "chat_messages", "reasoning_cot"):
        assert cfg.mask_prompt
        train = s.splits["train"]
        assert all(0 < m.sum() < len(m) for m in train.masks)  # prompts masked, answers trained
    if recipe.stem == "alpaca_chat":
        assert s.plan.module_names == ["k_proj", "o_proj", "q_proj", "v_proj"] and s.plan.rank == 16
        assert s.splits["train"].format == "alpaca"
    if recipe.stem == "reasoning_cot":
        assert len(s.plan.module_names) == 7 and s.splits["train"].format == "template"
        text = s.tokenizer.decode(s.splits["train"].sequences[0])
        assert "<think>" in text and "### Question:" in text
    if recipe.stem == "chat_messages":
        assert s.splits["train"].format == "chat"
