#!/usr/bin/env bash
# The offline demo: fine-tune the real pretrained stories260K model (it writes children's
# stories) on the WikiSQL sample and compare its greedy output before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MLXFT=.venv/bin/mlxft
MODEL=examples/models/stories260K
PROMPT=$'table: 1-10015132-11\ncolumns: Player, No., Nationality, Position, Years in Toronto, School/Club Team\nQ: What position does the player who played for butler cc (ks) play?\nA:'

$MLXFT info
echo
echo "=== Before fine-tuning (greedy) ==="
$MLXFT generate --model "$MODEL" --prompt "$PROMPT" --max-tokens 40 --temp 0
echo
echo "=== Before fine-tuning: exact match, ROUGE-L, BLEU on the 100 validation rows ==="
EVAL=(--model "$MODEL" --data examples/data/wikisql --split valid --text-split "A:" --max-tokens 64 --worst 1)
$MLXFT evaluate "${EVAL[@]}"
echo
echo "=== Fine-tuning: LoRA r16 on all layers, 300 steps (configs/demo.yaml) ==="
rm -rf adapters/demo
$MLXFT lora --config configs/demo.yaml
echo
echo "=== After fine-tuning (greedy, same prompt) ==="
$MLXFT generate --model "$MODEL" --adapter-path adapters/demo --prompt "$PROMPT" --max-tokens 40 --temp 0
echo
echo "=== After fine-tuning: the same validation rows ==="
$MLXFT evaluate "${EVAL[@]}" --adapter-path adapters/demo --report adapters/demo/eval_valid.json
