#!/usr/bin/env bash
# The paper's experiment in one command: SSB (sample -> train), the GRPO baseline on the same
# problems and step count, then base / SSB / GRPO in one table. Every step resumes, so after a
# stop rerun the same command and it continues where it stopped.
#
#   bash pipeline.sh                                   # Qwen/Qwen2.5-3B-Instruct, data from the hub
#   MODEL=/path/to/model DATA=../shared/data OUT=runs/paper bash pipeline.sh
#   LAUNCH="torchrun --nproc_per_node 8" bash pipeline.sh   # every step over 8 GPUs (README: torchrun)
#
# MODEL, OUT, DATA (a local mirror of the hub datasets; unset: download), and extra options for
# each step in SAMPLE_ARGS, TRAIN_ARGS, GRPO_ARGS, EVAL_ARGS (split on spaces; they win).
set -euo pipefail
MODEL=${MODEL:-Qwen/Qwen2.5-3B-Instruct}
OUT=${OUT:-runs/paper}
DATA_ARGS=(); EVAL_DATA=()
if [ -n "${DATA:-}" ]; then DATA_ARGS=(--data "$DATA"); EVAL_DATA=(--data-dir "$DATA"); fi
read -ra SAMPLE_X <<< "${SAMPLE_ARGS:-}"; read -ra TRAIN_X <<< "${TRAIN_ARGS:-}"
read -ra GRPO_X <<< "${GRPO_ARGS:-}"; read -ra EVAL_X <<< "${EVAL_ARGS:-}"
read -ra RUN <<< "${LAUNCH:-python}"
HERE=$(dirname "$0")

# stages 1-2: rollouts, hinted teacher, captured targets, until 256 pairs
"${RUN[@]}" "$HERE/sample.py" --model "$MODEL" "${DATA_ARGS[@]}" --out "$OUT/pairs.jsonl" "${SAMPLE_X[@]}"
# stage 3: the SSB student (LoRA r 32, T^2 KL at T 2, batch 4, 3 epochs, lr 2e-4)
"${RUN[@]}" "$HERE/train.py" --model "$MODEL" --pairs "$OUT/pairs.jsonl" --out "$OUT/ssb" "${TRAIN_X[@]}"
# the baseline: GRPO on the problems of those pairs, for as many optimizer steps
"${RUN[@]}" "$HERE/grpo.py" --model "$MODEL" "${DATA_ARGS[@]}" --match-ssb "$OUT/ssb" --out "$OUT/grpo" "${GRPO_X[@]}"
# stage 4: base, SSB and GRPO in one table
"${RUN[@]}" "$HERE/eval.py" --model "$MODEL" "${EVAL_DATA[@]}" --adapter ssb="$OUT/ssb/adapter" \
    --adapter grpo="$OUT/grpo/adapter" --out "$OUT/eval" "${EVAL_X[@]}"
