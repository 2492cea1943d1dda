"""`mlxft generate` / `chat`: greedy and sampled decoding, stop tokens, streaming text, bad
input."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from mlxft.cli import main
from mlxft.data.templates import chat_prompt_ids
from mlxft.errors import UserError
from mlxft.inference.load import load_for_inference
from mlxft.inference.sampling import (
    Sampler,
    SamplingParams,
    StreamDecoder,
    eos_ids,
    generate,
    raw_prompt_ids,
)

STORIES_START = ", there was a little girl named Lily"


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def greedy(loaded, prompt_ids, n, stops=frozenset()):
    return generate(
        loaded.backend,
        loaded.tokenizer,
        prompt_ids,
        Sampler(SamplingParams()),
        n,
        set(stops),
        loaded.context_length,
    )


def force_token(model_dir, prompt_ids, token, step):
    """Rewrite lm_head's row of `token` so greedy decoding after `prompt_ids` emits it as
    generated token number `step` and never before: solve h_j . w = target_j exactly for the
    final hidden states h_j of the first `step` positions (the other rows are untouched, so
    the tokens before it stay what the unmodified model picks)."""
    import mlx.core as mx

    loaded = load_for_inference(str(model_dir), with_tokenizer=False)
    tokens = [int(np.argmax(loaded.backend.logits(np.array([list(prompt_ids)]))[0, -1]))]
    for _ in range(step - 2):
        tokens.append(
            int(np.argmax(loaded.backend.logits(np.array([list(prompt_ids) + tokens]))[0, -1]))
        )
    seq = np.array([list(prompt_ids) + tokens])
    hidden = np.array(loaded.backend.model.model(mx.array(seq)))[0, -step:].astype(np.float64)
    logits = loaded.backend.logits(seq)[0, -step:].astype(np.float64)
    logits[:, token] = -np.inf
    target = logits.max(-1) - 1.0
    target[-1] += 2.0
    w, *_ = np.linalg.lstsq(hidden, target, rcond=None)
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["lm_head.weight"][token] = w.astype(np.float32)
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    return tokens[: step - 1]


@pytest.fixture
def chat_model(tiny_llama, tmp_path):
    """Tiny ChatML llama whose only <|im_end|> stop comes from the chat template (not
    generation_config)."""
    model = tmp_path / "chat"
    shutil.copytree(tiny_llama, model)
    (model / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2})
    )
    return model


# ---------------------------------------------------------------------------- real model, greedy
def test_stories_greedy_known_output(stories):
    result = run("generate", "--model", stories, "--prompt", "Once upon a time", "--max-tokens", 30)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(STORIES_START + ". She loved to play"), result.stdout
    assert "Prompt: 5 tokens" in result.stderr and "Generation: 30 tokens" in result.stderr
    assert "Peak memory" in result.stderr and "Peak memory" not in result.stdout


def test_greedy_is_deterministic_and_matches_full_sequence_argmax(stories):
    loaded = load_for_inference(str(stories))
    prompt = raw_prompt_ids(loaded.tokenizer, "Once upon a time")
    first, second = greedy(loaded, prompt, 24), greedy(loaded, prompt, 24)
    assert first.tokens == second.tokens and first.text == second.text
    logits = loaded.backend.logits(np.array([prompt + first.tokens]))[0]
    assert (
        logits[len(prompt) - 1 : -1].argmax(-1).tolist() == first.tokens
    )  # KV cache == full forward
    assert first.text == loaded.tokenizer.decode(first.tokens)
    assert first.finish_reason == "length" and first.prompt_tokens == len(prompt)


def test_torch_backend_greedy_text_equals_mlx(stories):
    args = [
        "generate",
        "--model",
        stories,
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        40,
        "--quiet",
    ]
    mlx_out, torch_out = run(*args), run(*args, "--backend", "torch")
    assert mlx_out.exit_code == 0 and torch_out.exit_code == 0, torch_out.output
    assert mlx_out.stdout.startswith(STORIES_START)
    assert torch_out.stdout == mlx_out.stdout


def test_prefill_in_chunks_equals_one_pass(stories, monkeypatch):
    from mlxft.mlx_backend import generate as kv

    loaded = load_for_inference(str(stories))
    prompt = raw_prompt_ids(
        loaded.tokenizer, "Once upon a time, there was a little girl named Lily. " * 6
    )
    whole = greedy(loaded, prompt, 12).tokens
    monkeypatch.setattr(kv, "PREFILL_CHUNK", 7)
    assert greedy(loaded, prompt, 12).tokens == whole


# ---------------------------------------------------------------------------- sampling
def test_sampler_matches_transformers_processors():
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = np.random.default_rng(0).normal(0, 1.0, size=300).astype(np.float32)
    context = [5, 7, 7, 100, 299, 3]
    for temp, top_p, top_k, penalty in [
        (0.7, 0.9, 40, 1.3),
        (1.3, 1.0, 0, 0.8),
        (1.0, 0.5, 0, 1.0),
    ]:
        ours = Sampler(SamplingParams(temp, top_p, top_k, penalty)).probabilities(logits, context)
        procs = [RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temp)]
        procs += [TopKLogitsWarper(top_k)] if top_k else []
        procs += [TopPLogitsWarper(top_p)] if top_p < 1 else []
        scores = LogitsProcessorList(procs)(
            torch.tensor([context]), torch.tensor(logits, dtype=torch.float64)[None]
        )
        theirs = torch.softmax(scores, -1)[0].numpy()
        assert np.abs(ours - theirs).max() < 1e-9
        assert 1 < (ours > 0).sum() <= (top_k or 300)


def test_seeded_sampling_is_reproducible(stories):
    args = [
        "generate",
        "--model",
        stories,
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        40,
        "--quiet",
        "--temp",
        "1.0",
        "--top-p",
        "0.95",
    ]
    a, b, c = run(*args, "--seed", 1), run(*args, "--seed", 1), run(*args, "--seed", 2)
    assert a.exit_code == 0, a.output
    assert a.stdout == b.stdout and a.stdout != c.stdout
    top1 = run(
        "generate",
        "--model",
        stories,
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        20,
        "--quiet",
        "--temp",
        "5",
        "--top-k",
        "1",
        "--seed",
        3,
    )
    assert top1.stdout.startswith(STORIES_START)  # top-k 1 is greedy at any temperature


def test_repetition_penalty_changes_greedy_text(stories):
    plain = run(
        "generate",
        "--model",
        stories,
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        40,
        "--quiet",
    )
    penal = run(
        "generate",
        "--model",
        stories,
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        40,
        "--quiet",
        "--repetition-penalty",
        "1.5",
    )
    assert penal.exit_code == 0 and penal.stdout != plain.stdout


# ---------------------------------------------------------------------------- stopping
def test_stops_at_tokenizer_eos_without_printing_it(tiny_llama, tmp_path):
    model = tmp_path / "eos"
    shutil.copytree(tiny_llama, model)
    loaded = load_for_inference(str(model))
    prompt = raw_prompt_ids(loaded.tokenizer, "Once upon a time")
    before = force_token(model, prompt, loaded.tokenizer.eos_token_id, step=4)
    result = run(
        "generate",
        "--model",
        model,
        "--prompt",
        "Once upon a time",
        "--ignore-chat-template",
        "--max-tokens",
        30,
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    expected = loaded.tokenizer.decode(before)
    assert result.stdout == expected + "\n" and "</s>" not in result.stdout


def test_chat_stops_at_im_end_from_the_template(chat_model):
    loaded = load_for_inference(str(chat_model))
    tok = loaded.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in eos_ids(tok, chat_model, loaded.model_config, chat=True)
    assert im_end not in eos_ids(tok, chat_model, loaded.model_config, chat=False)
    prompt = chat_prompt_ids(tok, [{"role": "user", "content": "hi"}])
    before = force_token(chat_model, prompt, im_end, step=4)

    result = run("generate", "--model", chat_model, "--chat", "hi", "--max-tokens", 30, "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout == tok.decode(before) + "\n" and "<|im_end|>" not in result.stdout
    # without the end-of-turn stop the same model runs on through <|im_end|>
    loaded = load_for_inference(str(chat_model))
    raw = greedy(loaded, prompt, 8, eos_ids(tok, chat_model, loaded.model_config, chat=False))
    assert raw.tokens[:4] == before + [im_end] and "<|im_end|>" in raw.text
    with_stop = greedy(loaded, prompt, 8, eos_ids(tok, chat_model, loaded.model_config, chat=True))
    assert with_stop.tokens == before and with_stop.finish_reason == "stop"


def test_generation_config_eos_list_is_read(stories):
    loaded = load_for_inference(str(stories))
    assert eos_ids(loaded.tokenizer, stories, loaded.model_config, chat=False) == {1, 2}


def test_prompt_wrapped_in_chat_template_unless_ignored(tiny_llama):
    loaded = load_for_inference(str(tiny_llama))
    wrapped = chat_prompt_ids(
        loaded.tokenizer,
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
    )
    expected = greedy(
        loaded, wrapped, 6, eos_ids(loaded.tokenizer, tiny_llama, loaded.model_config, True)
    ).text
    out = run(
        "generate",
        "--model",
        tiny_llama,
        "--prompt",
        "hello",
        "--system",
        "be brief",
        "-m",
        6,
        "--quiet",
    )
    assert out.exit_code == 0, out.output
    assert out.stdout == expected + "\n"
    raw_ids = raw_prompt_ids(loaded.tokenizer, "hello")
    expected_raw = greedy(
        loaded, raw_ids, 6, eos_ids(loaded.tokenizer, tiny_llama, loaded.model_config, False)
    ).text
    raw = run(
        "generate",
        "--model",
        tiny_llama,
        "--prompt",
        "hello",
        "--ignore-chat-template",
        "-m",
        6,
        "--quiet",
    )
    assert raw.stdout == expected_raw + "\n"


# ---------------------------------------------------------------------------- streaming text
@pytest.mark.parametrize("which", ["stories", "tiny"])
def test_stream_decoder_handles_partial_utf8(which, stories, tiny_llama):
    from mlxft.config import build_config
    from mlxft.hub import load_tokenizer

    tok = load_tokenizer(stories if which == "stories" else tiny_llama, build_config(None, {}))
    text = " héllo wörld ✓ 日本語 🙂 done"
    prompt = raw_prompt_ids(tok, "Once upon a time")
    ids = list(tok.encode(text, add_special_tokens=False))
    decoder = StreamDecoder(tok, prompt)
    pieces = [decoder.add(t) for t in ids] + [decoder.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 5  # text arrives as it grows, not at the end
    assert "".join(pieces) == tok.decode(prompt + ids)[len(tok.decode(prompt)) :]


def test_streamed_pieces_reach_the_callback(stories):
    loaded = load_for_inference(str(stories))
    pieces = []
    result = generate(
        loaded.backend,
        loaded.tokenizer,
        raw_prompt_ids(loaded.tokenizer, "Once upon a time"),
        Sampler(SamplingParams()),
        15,
        set(),
        loaded.context_length,
        on_text=pieces.append,
    )
    assert len(pieces) > 5 and "".join(pieces) == result.text


# ---------------------------------------------------------------------------- chat loop
def test_chat_keeps_history_and_resets(tiny_llama):
    out = run(
        "chat",
        "--model",
        tiny_llama,
        "-m",
        5,
        "--quiet",
        input="hi\nwhat?\n/reset\nwhat?\n/quit\nignored\n",
    )
    assert out.exit_code == 0, out.output
    loaded = load_for_inference(str(tiny_llama))
    stops = eos_ids(loaded.tokenizer, tiny_llama, loaded.model_config, True)

    def reply(messages):
        return greedy(loaded, chat_prompt_ids(loaded.tokenizer, messages), 5, stops).text

    r1 = reply([{"role": "user", "content": "hi"}])
    r2 = reply(
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": r1},
            {"role": "user", "content": "what?"},
        ]
    )
    r3 = reply([{"role": "user", "content": "what?"}])
    assert r2 != r3  # the history changes the answer, so the test can tell them apart
    assert out.stdout == f"{r1}\n{r2}\n{r3}\n"
    assert "[conversation reset]" in out.stderr


# ---------------------------------------------------------------------------- bad input
def test_prompt_longer_than_context_is_a_user_error(stories):
    out = run("generate", "--model", stories, "--prompt", "Lily " * 600)
    assert out.exit_code == 2
    assert "context window is 512" in out.stderr and "shorten the prompt" in out.stderr
    assert out.stderr.count("\n") == 1  # one line, no traceback


def test_generation_stops_at_the_context_window(stories):
    loaded = load_for_inference(str(stories))
    prompt = raw_prompt_ids(loaded.tokenizer, "Lily " * 480)
    result = greedy(loaded, prompt, 100)
    assert len(prompt) + len(result.tokens) == 512 and result.finish_reason == "context"


def test_cli_argument_errors(stories):
    both = run("generate", "--model", stories, "--prompt", "a", "--chat", "b")
    assert both.exit_code == 2 and "exactly one of --prompt" in both.stderr
    no_template = run("generate", "--model", stories, "--chat", "hi")
    assert no_template.exit_code == 2 and "no chat template" in no_template.stderr
    bad_temp = run("generate", "--model", stories, "--prompt", "a", "--temp", "-1")
    assert bad_temp.exit_code == 2 and "--temp must be >= 0" in bad_temp.stderr
    with pytest.raises(UserError, match="top-p"):
        Sampler(SamplingParams(top_p=0))


def test_qlora_adapter_generates_on_the_quantized_base(tiny_llama, tmp_path):
    from mlxft.adapters.files import trained_quantization
    from tests.test_fuse import small_data, train_adapter

    adapter = train_adapter(tiny_llama, small_data(tmp_path), tmp_path / "qlora", quantize=4)
    assert trained_quantization(str(adapter)) == {"quantize": 4, "q_group_size": 64}
    loaded = load_for_inference(
        str(tiny_llama), str(adapter), quantization=trained_quantization(str(adapter))
    )
    assert loaded.backend.quantized
    prompt = raw_prompt_ids(loaded.tokenizer, "table: 1-10015132-11")
    expected = greedy(
        loaded, prompt, 8, eos_ids(loaded.tokenizer, tiny_llama, loaded.model_config, False)
    ).text
    out = run(
        "generate",
        "--model",
        tiny_llama,
        "--adapter-path",
        adapter,
        "--prompt",
        "table: 1-10015132-11",
        "--ignore-chat-template",
        "-m",
        8,
    )
    assert out.exit_code == 0, out.output
    assert out.stdout == expected + "\n" and "Base quantized to 4 bits" in out.stderr


def test_torch_backend_with_adapter_equals_mlx(tiny_llama, tmp_path):
    from tests.test_fuse import small_data, train_adapter

    adapter = train_adapter(tiny_llama, small_data(tmp_path), tmp_path / "a", fine_tune_type="dora")
    args = [
        "generate",
        "--model",
        tiny_llama,
        "--adapter-path",
        adapter,
        "--chat",
        "table: 1-10015132-11",
        "-m",
        16,
        "--quiet",
    ]
    mlx_out, torch_out = run(*args), run(*args, "--backend", "torch")
    assert mlx_out.exit_code == 0 and torch_out.exit_code == 0, torch_out.output
    assert torch_out.stdout == mlx_out.stdout
    assert (
        mlx_out.stdout != run("generate", "--model", tiny_llama, *args[5:]).stdout
    )  # the adapter matters


def test_prompt_from_stdin(stories):
    out = run(
        "generate",
        "--model",
        stories,
        "--prompt",
        "-",
        "-m",
        10,
        "--quiet",
        input="Once upon a time",
    )
    assert out.exit_code == 0 and out.stdout.startswith(STORIES_START)
