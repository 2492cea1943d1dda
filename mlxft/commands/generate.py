"""`mlxft generate | chat | fuse | export | import`: thin click wrappers over
mlxft.inference.sampling, mlxft.inference.fuse and mlxft.adapters.interop (flag names as in
mlx-lm)."""

from __future__ import annotations

import sys

import click

from mlxft.errors import UserError, user_errors


def _model_options(fn):
    for option in reversed(
        [
            click.option("--model", required=True, help="Model directory or Hugging Face hub id."),
            click.option(
                "--adapter-path", help="Adapter directory (PEFT layout, as `mlxft lora` writes it)."
            ),
            click.option(
                "--backend", type=click.Choice(["mlx", "torch"]), default="mlx", show_default=True
            ),
            click.option(
                "--device", help="torch backend: mps, cuda or cpu (default: best available)."
            ),
            click.option(
                "--trust-remote-code", is_flag=True, help="Allow the tokenizer's custom code."
            ),
        ]
    ):
        fn = option(fn)
    return fn


def _sampling_options(fn):
    for option in reversed(
        [
            click.option(
                "--max-tokens",
                "-m",
                type=int,
                default=100,
                show_default=True,
                help="Most tokens to generate.",
            ),
            click.option(
                "--temp",
                type=float,
                default=0.0,
                show_default=True,
                help="Temperature; 0 = greedy.",
            ),
            click.option(
                "--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass."
            ),
            click.option(
                "--top-k",
                type=int,
                default=0,
                show_default=True,
                help="Keep the k most likely tokens (0: all).",
            ),
            click.option(
                "--repetition-penalty",
                type=float,
                default=1.0,
                show_default=True,
                help="Penalty for tokens already in the context (transformers' rule; 1 = off).",
            ),
            click.option("--seed", type=int, help="Seed for sampling."),
            click.option(
                "--system",
                "--system-prompt",
                "system",
                help="System message (chat templates only).",
            ),
            click.option(
                "--chat-template",
                help="Jinja chat template (text or file) instead of the tokenizer's.",
            ),
            click.option(
                "--verbose/--quiet",
                default=True,
                help="Statistics on stderr (default) or only the text.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def _session(kw):
    from mlxft.adapters.files import trained_quantization
    from mlxft.data.templates import read_chat_template
    from mlxft.inference.load import load_for_inference
    from mlxft.inference.sampling import Sampler, SamplingParams

    if kw["max_tokens"] < 1:
        raise UserError(f"--max-tokens must be at least 1, got {kw['max_tokens']}")
    sampler = Sampler(
        SamplingParams(kw["temp"], kw["top_p"], kw["top_k"], kw["repetition_penalty"], kw["seed"])
    )
    template = read_chat_template(kw["chat_template"])
    quantization = trained_quantization(kw["adapter_path"]) if kw["backend"] == "mlx" else {}
    loaded = load_for_inference(
        kw["model"],
        kw["adapter_path"],
        backend=kw["backend"],
        device=kw["device"],
        trust_remote_code=kw["trust_remote_code"],
        quantization=quantization,
    )
    if quantization and kw["verbose"]:
        click.echo(
            f"Base quantized to {quantization['quantize']} bits on load, as in the adapter's QLoRA "
            f"run",
            err=True,
        )
    return loaded, sampler, template


def _run(loaded, sampler, template, prompt_ids, chat: bool, kw):
    from mlxft.inference.sampling import eos_ids, generate

    stops = eos_ids(loaded.tokenizer, loaded.model_path, loaded.model_config, chat, template)

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = generate(
        loaded.backend,
        loaded.tokenizer,
        prompt_ids,
        sampler,
        kw["max_tokens"],
        stops,
        loaded.context_length,
        on_text=show,
    )
    show("\n")
    if kw["verbose"]:
        click.echo("=" * 10 + "\n" + result.stats(), err=True)
        if result.finish_reason == "context":
            click.echo(
                f"Stopped at the model's context window ({loaded.context_length} tokens).", err=True
            )
    return result


@click.command()
@_model_options
@click.option(
    "--prompt",
    "-p",
    help="Prompt text ('-' reads stdin); wrapped as a user message when the "
    "model has a chat template.",
)
@click.option(
    "--chat", "chat_message", help="A user message, always rendered with the chat template."
)
@click.option("--ignore-chat-template", is_flag=True, help="Feed --prompt to the model as is.")
@_sampling_options
@user_errors
def generate(**kw):
    """Generate text from a model, with an optional adapter."""
    from mlxft.data.templates import chat_prompt_ids, has_chat_template
    from mlxft.inference.sampling import raw_prompt_ids

    prompt, message = kw["prompt"], kw["chat_message"]
    if (prompt is None) == (message is None):
        raise UserError("pass exactly one of --prompt TEXT ('-' for stdin) and --chat MESSAGE")
    if prompt == "-":
        prompt = sys.stdin.read()
    loaded, sampler, template = _session(kw)
    tok = loaded.tokenizer
    templated = has_chat_template(tok, template) and not (
        prompt is not None and kw["ignore_chat_template"]
    )
    if message is not None and not has_chat_template(tok, template):
        raise UserError(
            f"{kw['model']}: the tokenizer has no chat template; use --prompt, or pass "
            f"--chat-template"
        )
    if not templated:
        if kw["system"]:
            raise UserError("--system needs a chat template (the prompt is used as is)")
        _run(loaded, sampler, template, raw_prompt_ids(tok, prompt), False, kw)
        return
    messages = ([{"role": "system", "content": kw["system"]}] if kw["system"] else []) + [
        {"role": "user", "content": message if message is not None else prompt}
    ]
    _run(loaded, sampler, template, chat_prompt_ids(tok, messages, template), True, kw)


@click.command()
@_model_options
@_sampling_options
@user_errors
def chat(**kw):
    """Chat in the terminal: one line per message; /reset starts over, /quit or EOF ends."""
    from mlxft.data.templates import chat_prompt_ids, has_chat_template

    loaded, sampler, template = _session(kw)
    if not has_chat_template(loaded.tokenizer, template):
        raise UserError(
            f"{kw['model']}: the tokenizer has no chat template; pass --chat-template or use "
            "`mlxft generate --prompt`"
        )
    start = [{"role": "system", "content": kw["system"]}] if kw["system"] else []
    history = list(start)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            click.echo(">> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            break
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            history = list(start)
            click.echo("[conversation reset]", err=True)
            continue
        if not line.strip():
            continue
        turn = history + [{"role": "user", "content": line}]
        try:
            result = _run(
                loaded,
                sampler,
                template,
                chat_prompt_ids(loaded.tokenizer, turn, template),
                True,
                kw,
            )
        except (
            UserError
        ) as err:  # e.g. the conversation outgrew the context window: keep the session
            click.echo(f"Error: {err} (/reset starts a new conversation)", err=True)
            continue
        history = turn + [{"role": "assistant", "content": result.text}]
