"""`mlxft export --to gguf | gguf-lora | ollama`: a trained model as llama.cpp / Ollama files.

One entry point, `export_to`, so the click command stays a thin wrapper.  Everything here
checks its inputs (adapter, architecture, destination) before the slow model load and writes
its outputs through `mlxft.fileio` under temporary names, so a failed export leaves nothing
half-written.  The weights come from the backend one tensor at a time
(`Backend.fused_tensors`), never as a second copy of the model.

Neither the training path nor `mlxft.cli` imports this package: `gguf` is an optional extra.
"""

from __future__ import annotations

from collections.abc import Callable

from mlxft.errors import UserError

TARGETS = ("gguf", "gguf-lora", "ollama")


def export_to(
    target: str,
    model: str | None,
    adapter_path: str | None,
    save_path: str,
    outtype: str = "f16",
    system: str | None = None,
    template: str | None = None,
    name: str | None = None,
    trust_remote_code: bool = False,
    note: Callable[[str], None] = lambda s: None,
) -> list:
    """Run one export; returns the lines to show the user."""
    if target not in TARGETS:
        raise UserError(f"--to must be one of mlx-lm, {', '.join(TARGETS)}, got '{target}'")
    if model is None:
        raise UserError(
            f"--to {target} needs --model (the base model, or a full fine-tune directory)"
        )
    if target != "ollama" and (system or template):
        raise UserError("--system and --template are for --to ollama (the Modelfile)")
    if target == "gguf-lora":
        from mlxft.export.gguf_lora import export_gguf_lora

        if adapter_path is None:
            raise UserError("--to gguf-lora needs --adapter-path (the adapter to write)")
        out = export_gguf_lora(model, adapter_path, save_path)
        return [
            f"Wrote {out} (LoRA adapter for llama.cpp: llama-cli -m BASE.gguf --lora {out.name}; "
            f"Ollama: ADAPTER {out.name})"
        ]
    if target == "ollama":
        from mlxft.export.ollama import export_ollama

        return export_ollama(
            model, adapter_path, save_path, outtype, system, template, name, trust_remote_code, note
        )
    from mlxft.export.gguf import export_gguf

    done = export_gguf(model, adapter_path, save_path, outtype, trust_remote_code, note)
    return [f"Wrote {done.path} ({done.arch}, {done.outtype})"]
