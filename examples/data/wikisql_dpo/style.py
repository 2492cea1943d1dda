"""Does the generated SQL follow the chosen style?  Greedy answers to held-out prompts, scored.

    python examples/data/wikisql_dpo/style.py --adapter-path adapters/dpo_wikisql [--n 40]

For each of the first `--n` pairs of valid.jsonl (held-out questions; `--split test`: tables
never trained on), the base model's and the adapted model's greedy answer (MAX_TOKENS, up to the
end of the line), and for each model the share of answers that
- are SQL: start with "SELECT" and have "FROM";
- select the column the chosen answer selects (the rejected answers often select another);
- use an aggregate exactly when the chosen answer does (the rejected answers add or swap one);
- quote the selected column in backticks as every chosen answer does, opening and closing
  (the style; WikiSQL's SQL, and so the SFT model, never does).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
# what is scored (SELECT [aggregate] column FROM) lies in an answer's first ~30 tokens
MAX_TOKENS = 40
SELECT = re.compile(r"^\s*SELECT (?:(COUNT|MAX|MIN|SUM|AVG) )?(.+?) FROM ")
QUOTED = re.compile(r"`[^`]+`")


def score(answers: list, pairs: list) -> dict:
    sql = column = aggregate = quoted = 0
    for text, pair in zip(answers, pairs):
        got, want = SELECT.match(text), SELECT.match(pair["chosen"])
        if got is None:
            continue
        quoted += QUOTED.fullmatch(got.group(2)) is not None
        sql += 1
        column += got.group(2).strip("`") == want.group(2).strip("`")
        aggregate += got.group(1) == want.group(1)
    n = max(len(answers), 1)
    return {
        "sql": sql / n,
        "chosen_column": column / n,
        "chosen_aggregate": aggregate / n,
        "quoted_column": quoted / n,
    }


def answers(model: str, adapter, prompts: list) -> list:
    from mlxft.inference.load import load_for_inference
    from mlxft.inference.sampling import Sampler, SamplingParams, generate, raw_prompt_ids

    loaded = load_for_inference(model, adapter)
    stops = {loaded.tokenizer.eos_token_id}
    out = []
    for prompt in prompts:
        result = generate(
            loaded.backend,
            loaded.tokenizer,
            raw_prompt_ids(loaded.tokenizer, prompt),
            Sampler(SamplingParams(0.0, 1.0, 0, 1.0, 0)),
            MAX_TOKENS,
            stops,
            loaded.context_length,
        )
        out.append(result.text.split("\n")[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "examples" / "models" / "stories260K"))
    parser.add_argument("--adapter-path", required=True)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--split", default="valid", choices=["valid", "test"])
    args = parser.parse_args()
    pairs = [
        json.loads(line)
        for line in (HERE / f"{args.split}.jsonl").read_text().splitlines()[: args.n]
    ]
    prompts = [p["prompt"] for p in pairs]
    report = {}
    for name, adapter in (("base", None), ("adapter", args.adapter_path)):
        texts = answers(args.model, adapter, prompts)
        report[name] = score(texts, pairs)
        report[name]["example"] = texts[0]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
