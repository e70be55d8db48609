"""SSB stages 1-2: sample rollouts, build hinted teacher solutions, optionally store teacher targets.

    python sample.py --data ../shared/data --out runs/ssb/pairs.jsonl
    python sample.py --out runs/ssb/pairs.jsonl --teacher-targets topk --targets-only

Writes, next to --out (runs/ssb/pairs.jsonl):
    pairs.jsonl           kept (question, teacher solution) pairs, read by train.py
    pairs.skipped.jsonl   every other problem with the reason, rejected solutions included
    pairs.run.json        the run's arguments: a restart must match them
    pairs.summary.json    counts, skip reasons, gate firings, tokens/s
    pairs.targets/        offline teacher targets (with --teacher-targets topk|full)
Killed at any point and restarted with the same arguments, it continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys

from minissb import gates
from minissb.cli import DTYPE_NAMES, HelpFormatter, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="SSB stage 1 (rollouts -> hinted teacher solutions -> pairs) and stage 2 (offline teacher targets).",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="Qwen/Qwen2.5-3B-Instruct", help="HF-format model directory or hub repo id; the default is the paper's model")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory; unset = the model's")
    g.add_argument("--dtype", default="bf16", choices=DTYPE_NAMES, help="weights and compute dtype (bf16 on CPU works too and halves memory)")
    g.add_argument("--device", default="auto", help="cuda, cuda:1, cpu, ... (auto: cuda when available)")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step (for CUDA)")
    g.add_argument("--dataset", default="gsm8k", help="gsm8k, math500 or aime24")
    g.add_argument("--split", default="train", help="dataset split (SSB trains on GSM8K train)")
    g.add_argument("--data", default=None, help="local data: a hub-layout mirror dir (e.g. ../shared/data), or a .jsonl/.parquet file; default: download from the hub")
    g.add_argument("--limit", type=int, default=None, help="use only the first N problems")
    g.add_argument("--out", default="runs/ssb/pairs.jsonl", help="pairs file; the other outputs are named after it")

    g = p.add_argument_group("stage 1: rollouts and teacher")
    g.add_argument("--num-pairs", type=int, default=256, help="stop after this many kept pairs (paper: 256)")
    g.add_argument("--k", type=int, default=4, dest="num_rollouts", metavar="K", help="rollouts per problem (paper: 4)")
    g.add_argument("--temperature", type=float, default=0.8, dest="rollout_temperature", metavar="T", help="rollout sampling temperature (paper: 0.8)")
    g.add_argument("--top-k", type=int, default=50, help="top-k filter for rollouts and teacher, 0 = off (paper: 50)")
    g.add_argument("--teacher-temperature", type=float, default=0.4, help="teacher sampling temperature (paper: 0.4)")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="new-token cap per rollout (the original code allowed 8192; Qwen2.5 GSM8K solutions take ~150-400 tokens, so 1024 cuts few and bounds the KV cache)")
    g.add_argument("--teacher-max-new-tokens", type=int, default=None, help="new-token cap for teacher solutions; unset = --max-new-tokens")
    g.add_argument("--batch-size", type=int, default=16, help="problems per generation batch (each gives K rollout rows)")
    g.add_argument("--hint-order", default="correct-first", choices=["correct-first", "wrong-first"], help="order of the two attempts in the teacher prompt (paper: correct first)")
    g.add_argument("--hint-gold", action="store_true", help="also tell the teacher the gold final answer")
    g.add_argument("--copy-threshold", type=float, default=gates.COPY_THRESHOLD,
                   help=f"copy gate: reject a teacher solution when more than this share of its {gates.COPY_NGRAM}-word n-grams (outside the question) is in an attempt or the prompt")
    g.add_argument("--keep-rollouts", action="store_true", help="also store every rollout's text in the records")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")

    g = p.add_argument_group("stage 2: offline teacher targets")
    g.add_argument("--teacher-targets", default="none", choices=["none", "topk", "full"],
                   help="store the teacher's distributions next to the pairs: sparse top-k log-probs, or full-vocabulary bf16 logits (none: train.py computes them online)")
    g.add_argument("--targets-k", type=int, default=64, help="tokens kept per position in topk mode")
    g.add_argument("--targets-temperature", type=float, default=2.0, help="the training temperature the top-k log-probs are taken at")
    g.add_argument("--targets-only", action="store_true", help="skip stage 1: only compute targets for the existing --out pairs file")
    g.add_argument("--targets-batch-size", type=int, default=1, help="pairs per teacher forward pass")
    g.add_argument("--chunk-size", type=int, default=256, help="positions per LM-head chunk when computing targets")

    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from minissb.ssb import sample_main  # after parsing, so --help is instant

    return run_main(lambda: sample_main(args))


if __name__ == "__main__":
    sys.exit(main())
