"""GGUF export: time and peak memory per outtype, and what each outtype costs in perplexity.

    python benchmarks/make_bench_model.py     # once: the 40M bench model under benchmarks/.cache/
    python benchmarks/gguf_export.py          # prints the tables of RESULTS.md

Each export is its own `mlxft export --to gguf` process, so its peak RSS (ru_maxrss of that
child) is the export's own, next to the size of the model's safetensors and the RSS of a process
that only imports the same libraries.  Perplexity is computed by llama.cpp (llama-cpp-python,
f32 KV cache) on WikiSQL validation rows, for the 40M bench model (random init: the figures show
each outtype's numerical drift, not quality) and for stories260K (a trained model), next to the
same rows through mlxft's MLX model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import run_measured  # noqa: E402

OUT = HERE / ".cache" / "gguf"
MODELS = {
    "bench-40m": HERE / ".cache" / "bench-40m",
    "stories260K": HERE.parent / "examples" / "models" / "stories260K",
}
OUTTYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"]
WIKISQL_VALID = HERE.parent / "examples" / "data" / "wikisql" / "valid.jsonl"


def rows(n: int) -> list:
    return [json.loads(line)["text"] for line in WIKISQL_VALID.read_text().splitlines()[:n]]


def nll(logits, ids) -> tuple:
    import numpy as np

    logits = np.asarray(logits[:-1], dtype=np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -float(logp[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1


def perplexities(model: Path, files: dict, n_rows: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    from mlxft.inference.load import load_for_inference

    loaded = load_for_inference(str(model))
    texts = [loaded.tokenizer.encode(t)[:512] for t in rows(n_rows)]
    out = {}
    totals = [nll(loaded.backend.logits(np.array([ids]))[0], ids) for ids in texts]
    out["mlxft (MLX)"] = math.exp(sum(t[0] for t in totals) / sum(t[1] for t in totals))
    for outtype, path in files.items():
        llm = Llama(str(path), n_ctx=1024, logits_all=True, type_k=0, type_v=0, verbose=False)
        total, count = 0.0, 0
        for ids in texts:
            llm.reset()
            llm.eval(ids)
            t, c = nll(np.array(llm.scores[: len(ids)]), ids)
            total, count = total + t, count + c
        out[outtype] = math.exp(total / count)
    return out


def export_all(models: dict, outtypes: list) -> dict:
    """Every export as its own process (benchmarks.common.measure: that child's peak alone)."""
    out = {}
    for name, model in models.items():
        weights = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e9
        rows_out = []
        for outtype in outtypes:
            path = OUT / f"{name}-{outtype}.gguf"
            cmd = [sys.executable, "-m", "mlxft", "export", "--to", "gguf", "--model", model]
            cmd += ["--outtype", outtype, "--save-path", path]
            log = OUT / "logs" / f"{name}-{outtype}.log"
            code, seconds, rss = run_measured(f"{name}-{outtype}", cmd, log)
            if code != 0:
                sys.exit(f"export failed, see {log}")
            rows_out.append(
                {
                    "outtype": outtype,
                    "path": str(path),
                    "seconds": seconds,
                    "peak_rss_gb": rss,
                    "file_gb": path.stat().st_size / 1e9,
                }
            )
        out[name] = {"weights_gb": weights, "exports": rows_out}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outtypes", default=",".join(OUTTYPES))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument(
        "--rows", type=int, default=24, help="WikiSQL validation rows for perplexity"
    )
    parser.add_argument("--no-perplexity", action="store_true", help="time and memory only")
    args = parser.parse_args()
    outtypes = args.outtypes.split(",")
    models = {name: MODELS[name] for name in args.models.split(",")}
    if "bench-40m" in models and not MODELS["bench-40m"].is_dir():
        sys.exit(
            "benchmarks/.cache/bench-40m is missing: "
            "run python benchmarks/make_bench_model.py first"
        )
    imports = [
        sys.executable,
        "-c",
        "import mlxft.export.gguf, mlxft.inference.load, mlx_lm, transformers, gguf, llama_cpp",
    ]
    code, _, baseline = run_measured("imports", imports, OUT / "logs" / "imports.log")
    assert code == 0
    results = export_all(models, outtypes)
    for name, model in models.items():
        files = {row["outtype"]: Path(row["path"]) for row in results[name]["exports"]}
        results[name]["perplexity"] = (
            {} if args.no_perplexity else perplexities(model, files, args.rows)
        )
    results["imports_only_rss_gb"] = baseline
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    print(f"imports alone: peak RSS {baseline:.3f} GB")
    for name in models:
        r = results[name]
        ppl = r["perplexity"]
        print(
            f"\n{name}: safetensors {r['weights_gb'] * 1000:.1f} MB; "
            "perplexity through mlxft (MLX) "
            f"{ppl.get('mlxft (MLX)', float('nan')):.3f} on {args.rows} WikiSQL valid rows\n"
        )
        print(
            "| outtype | export s | peak RSS GB | RSS over imports GB | file MB "
            "| perplexity (llama.cpp) |"
        )
        print("|---|---|---|---|---|---|")
        for row in r["exports"]:
            print(
                f"| {row['outtype']} | {row['seconds']:.1f} | {row['peak_rss_gb']:.3f} | "
                f"{row['peak_rss_gb'] - baseline:.3f} | {row['file_gb'] * 1000:.1f} | "
                f"{ppl.get(row['outtype'], float('nan')):.3f} |"
            )


if __name__ == "__main__":
    main()
