"""benchmarks/results.json -> the generated part of benchmarks/RESULTS.md.

RESULTS.md = generated tables between the markers below + hand-written analysis after them
(kept as is on regeneration), so rerunning `run_all.py` refreshes figures without losing the
explanations.  `python benchmarks/report.py` re-renders from results.json without running.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import train_flops_per_token

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- BEGIN GENERATED (benchmarks/run_all.py) -->", "<!-- END GENERATED -->"
TARGETS = {"mlx_lm": 1.2, "peft-trainer": 1.1, "peft-loop": 1.1}
LABEL = {
    "mlxft-mlx": "mlxft (MLX)",
    "mlxft-torch": "mlxft (torch)",
    "mlx_lm": "mlx_lm lora",
    "peft-trainer": "PEFT + HF Trainer",
    "peft-loop": "PEFT plain loop",
}


def _f(x, fmt="{:.0f}", none="–"):
    return none if x is None else fmt.format(x)


def machine_block(r: dict) -> list:
    m, after = r.get("machine_before", {}), r.get("machine_after", {})
    v = m.get("versions", {})
    meta = (
        r.get("pairs_meta") or r
    )  # the pairs' own settings when a later run redid other suites only
    # the run itself keeps `threads` cores busy (all of them by default): only load beyond that
    # at its end means another job shared the machine
    own = meta.get("threads") if isinstance(meta.get("threads"), int) else (m.get("nproc") or 1)
    busy = (after.get("load_average") or [0])[0] > own + 0.5
    lines = [
        f"- Date: {m.get('date')} → {after.get('date')} ({r.get('elapsed_seconds', 0) / 60:.0f} "
        f"min; suites last run: "
        + ", ".join(f"{k} {v}" for k, v in (r.get("suites_run") or {}).items())
        + ")",
        f"- Pairs: mode `{meta.get('mode')}`, {meta.get('steps')} steps per run, first "
        f"{meta.get('warmup')} left out "
        f"of rates, {meta.get('reps')} alternating repetition(s) per pair; BLAS/OpenMP threads: "
        f"{meta.get('threads')}",
        f"- Machine: {m.get('cpu')}, {m.get('nproc')} CPUs, {m.get('ram_gb')} GB RAM, "
        f"{m.get('platform')}",
        f"- Load average (1/5/15 min) before: {m.get('load_average')}, after: "
        f"{after.get('load_average')}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
    ]
    if busy:
        lines.insert(
            0,
            "**PRELIMINARY: the machine was busy (load average above what the run itself makes) "
            "while "
            "these ran; absolute figures are low and noisy. Rerun on a quiet machine.**\n",
        )
    return lines


def peak_rows(r: dict) -> list:
    """[(library, sgemm GFLOP/s)] measured on this machine, in table order."""
    p = r.get("peak", {})
    mlx, own, ref, torch = (
        p.get(k, {}) for k in ("mlx", "mlx_own_kernels", "mlx_reference", "torch")
    )
    rows = [(f"MLX + {mlx.get('blas')}", mlx.get("gflops"))]
    if own:
        rows.append(
            (
                f"MLX + {own.get('blas')} — OPENBLAS_CORETYPE/L2_SIZE unset, OpenBLAS's own pick",
                own.get("gflops"),
            )
        )
    rows += [
        (f"MLX + {ref.get('blas')}", ref.get("gflops")),
        (f"torch default (MKL, {torch.get('threads')} threads)", torch.get("gflops")),
        ("torch via oneDNN (`mlxft.torch_backend.cpu_matmul`)", torch.get("onednn_gflops")),
    ]
    return rows


def machine_peak(r: dict) -> float | None:
    """The machine's matmul peak: the best float32 sgemm any library measured on it (the
    reference BLAS never is)."""
    rates = [rate for _, rate in peak_rows(r) if rate]
    return max(rates) if rates else None


def peak_block(r: dict) -> list:
    if not r.get("peak"):
        return []
    rows = ["| framework / BLAS | sgemm peak GFLOP/s (best of n=1024, 2048) |", "|---|---|"]
    rows += [f"| {name} | {_f(rate, '{:.1f}')} |" for name, rate in peak_rows(r)]
    rows += [
        "",
        f"MFU denominator: the machine's peak, the best of these: "
        f"**{_f(machine_peak(r), '{:.1f}')} GFLOP/s**.",
    ]
    return ["### Matmul peak (MFU denominator)", "", *rows, ""]


def mfu(r: dict, setting: str, rate: float, trainer: str) -> float | None:
    peak = machine_peak(r)
    if not peak or not rate:
        return None
    if r["settings"][setting].get("mask_prompt"):
        # trained tokens are a fraction of the tokens processed: tok/s x FLOPs/token misleads
        return None
    data = r["settings"][setting]["data"]
    stats_path = HERE / ".cache" / "data" / "stats.json"
    seq = (
        json.loads(stats_path.read_text())[f"{data}/train"]["mean"]
        if stats_path.exists()
        else r["settings"][setting]["seq"]
    )
    flops = train_flops_per_token(HERE.parent / r["model"], seq)
    return rate * flops / (peak * 1e9)


def pairs_block(r: dict) -> list:
    pairs = r.get("pairs")
    if not pairs:
        return []
    rows = [
        "| setting | ours | tok/s | anchor | tok/s | ratio (target) | peak mem ours / anchor (GB, "
        "framework) "
        "| peak RSS ours / anchor (GB) | MFU ours / anchor | loss first→last ours / anchor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in pairs:
        a, b = p["results"][p["ours"]], p["results"][p["anchor"]]
        desc = r["settings"][p["setting"]]["describe"]
        if not (a.get("ok") and b.get("ok")):
            failed = p["ours"] if not a.get("ok") else p["anchor"]
            rows.append(
                f"| {desc} | {LABEL[p['ours']]} | | {LABEL[p['anchor']]} | | **{failed} failed** | "
                f"| | | |"
            )
            continue
        target = TARGETS[p["anchor"]]
        mark = "✅" if p["ratio"] >= target else "❌"
        ma, mb = (
            mfu(r, p["setting"], a["tokens_per_second"], p["ours"]),
            mfu(r, p["setting"], b["tokens_per_second"], p["anchor"]),
        )
        rows.append(
            f"| {desc} | {LABEL[p['ours']]} | {a['tokens_per_second']:.0f} | {LABEL[p['anchor']]} "
            f"| "
            f"{b['tokens_per_second']:.0f} | {mark} {p['ratio']:.2f}x (≥{target}x) | "
            f"{_f(a['peak_memory_gb'], '{:.2f}')} / {_f(b['peak_memory_gb'], '{:.2f}')} | "
            f"{a['peak_rss_gb']:.2f} / {b['peak_rss_gb']:.2f} | {_f(ma and 100 * ma, '{:.1f}%')} / "
            f"{_f(mb and 100 * mb, '{:.1f}%')} | {a['first_loss']:.3f}→{a['last_loss']:.3f} / "
            f"{_f(b['first_loss'], '{:.3f}')}→{_f(b['last_loss'], '{:.3f}')} |"
        )
    notes = [
        "",
        "tok/s = trained (non-padding) target tokens per second of step time, median over "
        "repetitions, "
        "warm-up steps excluded; mlx_lm's own count includes one padding target per row (its "
        "mask), "
        "subtracted here. Framework peak memory: MLX's allocator peak (`mx.get_peak_memory`); on "
        "CPU the "
        "torch backends report process RSS. Peak RSS: the kernel's figure for that process alone "
        "(`wait4`).",
        "MFU: tok/s × model FLOPs per token (4N for the frozen linears incl. lm_head + 6·L·d·T "
        "causal attention, "
        "T = mean row length) / the machine's measured sgemm peak (n×n products, so shapes where a "
        "BLAS does "
        "better than on squares can read high).",
    ]
    return ["### Trainer vs anchor, identical settings", "", *rows, *notes, ""]


def blas_block(r: dict) -> list:
    b = r.get("blas")
    if not b:
        return []
    s = r["settings"][b["setting"]]["describe"]
    return [
        "### BLAS before/after (issue #2)",
        "",
        f"Our MLX trainer, {s}, {b['steps']} steps ({b['warmup']} warm-up):",
        "",
        "| BLAS | tok/s |",
        "|---|---|",
        f"| wheel's reference BLAS (`MLXFT_BLAS=reference`) | "
        f"{_f(b['reference']['tokens_per_second'], '{:.1f}')} |",
        f"| OpenBLAS (default) | {_f(b['openblas']['tokens_per_second'], '{:.1f}')} |",
        f"| mlx_lm lora, reference BLAS | "
        f"{_f(b['mlx_lm_reference']['tokens_per_second'], '{:.1f}')} |",
        *(
            [
                f"| OpenBLAS with its own kernel choice (the machine's OPENBLAS_CORETYPE and "
                f"OPENBLAS_L2_SIZE unset) | "
                f"{_f(b['openblas_own_kernels']['tokens_per_second'], '{:.1f}')} |"
            ]
            if "openblas_own_kernels" in b
            else []
        ),
        "",
        f"Speed-up from OpenBLAS: **{_f(b.get('speedup'), '{:.1f}x')}**",
        "",
    ]


def attribution_block(r: dict) -> list:
    a = r.get("attribution")
    if not a:
        return []
    out = []
    for setting in dict.fromkeys(row["setting"] for row in a["rows"]):
        chosen = [row for row in a["rows"] if row["setting"] == setting]
        rows = [
            "| trainer and switches | tok/s | vs mlx_lm / PEFT as shipped | peak mem GB "
            "(framework) | peak RSS GB |",
            "|---|---|---|---|---|",
        ]
        shipped = {
            row["trainer"]: row["tokens_per_second"]
            for row in chosen
            if "as shipped" in row["label"]
        }
        for row in chosen:
            base = (
                shipped.get("mlx_lm")
                if row["trainer"] in ("mlxft-mlx", "mlx_lm")
                else shipped.get("peft-trainer")
            )
            ratio = f"{row['tokens_per_second'] / base:.2f}x" if row["ok"] and base else "–"
            env = " ".join(f"{k}={v}" for k, v in row["env"].items())
            rows.append(
                f"| {row['label']}{f' (`{env}`)' if env else ''} | {_f(row['tokens_per_second'])} "
                f"| {ratio} | "
                f"{_f(row['peak_memory_gb'], '{:.2f}')} | {_f(row['peak_rss_gb'], '{:.2f}')} |"
            )
        out += [
            f"### Where the gains come from ({r['settings'][setting]['describe']}, {a['steps']} "
            f"steps, "
            f"first {a['warmup']} left out)",
            "",
            *rows,
            "",
        ]
    return out


def compile_block(r: dict) -> list:
    c = r.get("compile")
    if not c:
        return []
    rows = [
        "| setting | eager (default on CPU) | compiled, cold kernel cache | compiled, warm cache |",
        "|---|---|---|---|",
    ]
    for row in c:

        def cell(k):
            e = row[k]
            return (
                f"{_f(e['tokens_per_second'])} tok/s steady, "
                f"{_f(e['all_steps_tokens_per_second'])} all steps, "
                f"first step {_f(e['first_step_seconds'], '{:.1f}')} s"
                if e["ok"]
                else "failed"
            )

        rows.append(
            f"| {r['settings'][row['setting']]['describe']} | {cell('eager')} | "
            f"{cell('compiled_cold')} | "
            f"{cell('compiled_warm')} |"
        )
    return ["### mx.compile vs eager on CPU (`MLXFT_COMPILE=1`)", "", *rows, ""]


def profile_block(r: dict) -> list:
    prof = r.get("profile")
    if not prof:
        return []
    rows = [
        "| setting / framework | step s | forward s | attention fwd+bwd ×L (share) | softmax fwd "
        "×L (share) "
        "| head matmul + cross-entropy fwd+bwd (share) | exp M elem/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, e in prof.items():
        if "error" in e:
            rows.append(f"| {key} | failed | | | | | |")
            continue
        rows.append(
            f"| {key} (B={e['batch']}, T={e['seq']}) | {e['step']:.2f} | {e['forward']:.2f} | "
            f"{e['attention']:.2f} ({100 * e['attention_share']:.0f}%) | {e['softmax']:.2f} "
            f"({100 * e['softmax_share']:.0f}%) | {e['loss_head']:.2f} "
            f"({100 * e['loss_head_share']:.0f}%) | "
            f"{e['exp_melem_per_s']:.0f} |"
        )
        if "attention_mlx_sdpa" in e:
            rows.append(
                f"| ↳ same, MLX's own ops | | | {e['attention_mlx_sdpa']:.2f} | "
                f"{e['softmax_mlx']:.2f} | "
                f"{e['loss_head_plain']:.2f} | |"
            )
    return [
        "### Profile of one step (benchmarks/profile_step.py)",
        "",
        "MLX rows time what our CPU step runs (power-exp attention, chunked head loss); the row "
        "under "
        "each shows MLX's own SDPA, `mx.softmax` and the plain head + cross-entropy on the same "
        "tensors.",
        "",
        *rows,
        "",
    ]


def bench_block(r: dict) -> list:
    b = r.get("bench")
    if not b:
        return []
    if "error" in b:
        return [
            "### `mlxft bench` (MLX vs torch backend)",
            "",
            f"failed: `{b['error'][-300:]}`",
            "",
        ]
    rows = [
        "| backend | device | dtype | tok/s | step ms median (p10–p90) | peak mem GB (framework) | "
        "peak RSS GB "
        "| loss first → last |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in b["backends"].items():
        st = e["step_time"]
        rows.append(
            f"| {name} | {e['device']} | {e['dtype']} | {e['tokens_per_second']:.0f} | "
            f"{1e3 * st['median']:.0f} "
            f"({1e3 * st['p10']:.0f}–{1e3 * st['p90']:.0f}) | {e['peak_memory_gb']:.2f} | "
            f"{e['peak_rss_gb']:.2f} "
            f"| {e['first_loss']:.4f} → {e['last_loss']:.4f} |"
        )
    notes = [f"`{b['command']}` ({b['steps']} steps, {b['warmup']} warm-up)."]
    for pair, d in (b.get("loss_difference") or {}).items():
        notes.append(
            f"Loss difference {pair} on identical batches: max |Δ| {d['max_abs']:.1e} over "
            f"{b['steps']} steps."
        )
    return [
        "### `mlxft bench` (MLX vs torch backend, same batches, same LoRA init)",
        "",
        *rows,
        "",
        *notes,
        "",
    ]


def commands_block(r: dict) -> list:
    seen, lines = set(), []
    for p in r.get("pairs", []):
        for name in (p["ours"], p["anchor"]):
            cmd = p["results"][name].get("command")
            if cmd and name not in seen:
                seen.add(name)
                lines.append(f"- {LABEL[name]} ({p['setting']}): `{cmd}`")
    b = r.get("blas")
    if b:
        lines.append(f"- BLAS before: `MLXFT_BLAS=reference {b['reference']['command']}`")
    for row in r.get("compile", []):
        lines.append(
            f"- compiled ({row['setting']}): `MLXFT_COMPILE=1 TMPDIR=<fresh dir> {row['command']}`"
        )
    if isinstance(r.get("threads"), int):
        n = r["threads"]
        lines.insert(
            0,
            f"- every process ran with `OMP_NUM_THREADS={n} OPENBLAS_NUM_THREADS={n} "
            f"MKL_NUM_THREADS={n}` "
            f"(`run_all.py --threads {n}`)",
        )
    return [
        "### Exact commands (one per trainer; the other settings change "
        "data/batch/length/keys/ckpt)",
        "",
        *lines,
        "",
    ]


def generated(r: dict) -> str:
    parts = [
        "## Figures",
        "",
        *machine_block(r),
        "",
        *peak_block(r),
        *pairs_block(r),
        *blas_block(r),
        *attribution_block(r),
        *compile_block(r),
        *bench_block(r),
        *profile_block(r),
        *commands_block(r),
    ]
    return "\n".join(parts)


def write_results_md(results: dict, path: Path) -> None:
    head = (
        "# Benchmarks\n\nRegenerate: `python benchmarks/make_bench_model.py && python "
        "benchmarks/run_all.py` "
        "(`--quick` for a smoke pass). See the analysis below the figures.\n\n"
    )
    tail = "\n## Analysis\n\n(write the analysis here; it is kept when figures are regenerated)\n"
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            head = text.split(BEGIN)[0]
            tail = text.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{generated(results)}\n{END}{tail}")


if __name__ == "__main__":
    results_path = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results.json"
    write_results_md(json.loads(results_path.read_text()), HERE / "RESULTS.md")
    print(f"Wrote {HERE / 'RESULTS.md'}")
