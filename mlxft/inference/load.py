"""Load a model (+ an optional adapter) for inference, on either backend.

`generate`, `chat` and `fuse` share this path, so an adapter that does not fit its base is
the same one-line error everywhere, and the backend sees the exact plan the adapter was
saved with (targets, rank, scale) rather than whatever the current config would choose.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

from mlxft.adapters.files import load_adapter
from mlxft.adapters.targets import AdapterPlan, plan_from_adapter
from mlxft.backend import Backend
from mlxft.backends import get_backend
from mlxft.config import build_config
from mlxft.hub import load_tokenizer, resolve_model
from mlxft.model_dir import read_model_config


@dataclass
class Loaded:
    backend: Backend
    tokenizer: object
    model_path: Path
    model_config: dict  # config.json as read by mlxft.hub.read_model_config
    plan: AdapterPlan | None = None

    @property
    def context_length(self) -> int | None:
        return context_length(self.model_config)


def context_length(model_config: dict) -> int | None:
    """The longest sequence the model was built for (None when its config.json does not say)."""
    value = (
        model_config.get("max_position_embeddings")
        or model_config.get("n_positions")
        or model_config.get("seq_length")
    )
    return int(value) if value else None


def load_for_inference(
    model: str,
    adapter_path: str | None = None,
    backend: str = "mlx",
    device: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    with_tokenizer: bool = True,
    quantization: dict | None = None,
) -> Loaded:
    """Resolve `model`, load it on `backend` (quantized on load if `quantization` says so, as
    for QLoRA training), attach the adapter in `adapter_path` if given."""
    cfg = build_config(
        None,
        {
            "model": model,
            "backend": backend,
            "device": device,
            "dtype": dtype,
            "trust_remote_code": trust_remote_code,
            "revision": revision,
            **(quantization or {}),
        },
    )
    if (
        adapter_path is not None
    ):  # read the adapter first: a bad adapter dir fails before a slow model load
        adapter_dir = Path(adapter_path).expanduser()
        adapter_config, weights = load_adapter(adapter_dir)
    model_path = resolve_model(cfg.model, cfg.revision)
    tokenizer = None
    if with_tokenizer:
        tokenizer = load_tokenizer(model_path, cfg)
    engine = get_backend(cfg)
    with contextlib.redirect_stdout(
        sys.stderr
    ):  # stdout carries only generated text (mlx-lm prints on quantize)
        engine.load(model_path)
    plan = None
    if adapter_path is not None:
        plan = plan_from_adapter(
            engine.linear_modules(), engine.num_blocks(), adapter_config, weights
        )
        engine.add_adapters(plan)
        engine.set_adapter_weights(weights)
    return Loaded(engine, tokenizer, model_path, read_model_config(model_path), plan)
