"""SSB stages 1-2: sample rollouts, build hinted teacher solutions, capture the teacher's targets.

    python sample.py --data ../shared/data --out runs/ssb/pairs.jsonl

Writes, next to --out (runs/ssb/pairs.jsonl):
    pairs.jsonl           kept (question, teacher solution) pairs, read by train.py
    pairs.skipped.jsonl   every other problem with the reason, rejected solutions included
    pairs.run.json        the run's arguments: a restart must match them
    pairs.summary.json    counts, skip reasons, gate firings, tokens/s
    pairs.targets/        the teacher's hidden states on each kept solution (train.py --teacher captured)
Killed at any point and restarted with the same arguments, it continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys

from minissb import gates
from minissb.cli import DTYPE_HELP, DTYPE_NAMES, ArgumentParser, HelpFormatter, float_range, int_range, run_main
from minissb.recipes import add_recipe_argument, parse_with_recipe


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="SSB stage 1 (rollouts -> hinted teacher solutions -> pairs) and stage 2 (the teacher's targets, captured as it writes).",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="Qwen/Qwen2.5-3B-Instruct", help="HF-format model directory or hub repo id; the default is the paper's model")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory; unset = the model's")
    g.add_argument("--dtype", default="auto", choices=DTYPE_NAMES, help=DTYPE_HELP)
    g.add_argument("--device", default="auto", help="cuda, cuda:1, cpu, ... (auto: cuda when available)")
    g.add_argument("--cuda-graphs", action="store_true", help="capture the decode step in CUDA graphs (not yet measured on a GPU)")
    g.add_argument("--dataset", default="gsm8k", help="gsm8k, math500 or aime24")
    g.add_argument("--split", default="train", help="dataset split (SSB trains on GSM8K train)")
    g.add_argument("--data", default=None, help="local data: a hub-layout mirror dir (e.g. ../shared/data), or a .jsonl/.parquet file; default: download from the hub")
    g.add_argument("--limit", type=int_range(1), default=None, help="use only the first N problems")
    g.add_argument("--out", default="runs/ssb/pairs.jsonl", help="pairs file; the other outputs are named after it")

    g = p.add_argument_group("stage 1: rollouts and teacher")
    g.add_argument("--num-pairs", type=int_range(1), default=256, help="stop after this many kept pairs (paper: 256)")
    g.add_argument("--k", type=int_range(2), default=4, dest="num_rollouts", metavar="K", help="rollouts per problem (paper: 4)")
    g.add_argument("--temperature", type=float_range(0), default=0.8, dest="rollout_temperature", metavar="T", help="rollout sampling temperature (paper: 0.8)")
    g.add_argument("--top-k", type=int_range(0), default=50, help="top-k filter for rollouts and teacher, 0 = off (paper: 50)")
    g.add_argument("--top-p", type=float_range(0, 1, low_open=True), default=None, help="nucleus filter for rollouts and teacher (the original code inherits 0.8 from Qwen2.5's generation config)")
    g.add_argument("--repetition-penalty", type=float_range(0, low_open=True), default=1.0, help="Hugging Face repetition penalty, 1 = off (the original inherits 1.05)")
    g.add_argument("--teacher-temperature", type=float_range(0), default=0.4, help="teacher sampling temperature (paper: 0.4)")
    g.add_argument("--max-new-tokens", type=int_range(1), default=1024, help="new-token cap per rollout (the original code allowed 8192; Qwen2.5 GSM8K solutions take ~150-400 tokens, so 1024 cuts few and bounds the KV cache)")
    g.add_argument("--teacher-max-new-tokens", type=int_range(1), default=None, help="new-token cap for teacher solutions; unset = --max-new-tokens")
    g.add_argument("--batch-size", type=int_range(1), default=64, help="engine slots: sequences decoded together (a problem's K rollouts take K)")
    g.add_argument("--hint-order", default="correct-first", choices=["correct-first", "wrong-first"], help="order of the two attempts in the teacher prompt (paper: correct first)")
    g.add_argument("--hint-gold", action="store_true", help="also tell the teacher the gold final answer")
    g.add_argument("--system-prompt-file", default=None, help="the system prompt for rollouts, teacher and the stored student chat, from a text file (default: minissb's)")
    g.add_argument("--teacher-prompt-file", default=None,
                   help="the teacher's user turn from a text file, with {question}, {correct}, {wrong} (and optionally {gold}) "
                        "filled in; its own order of sections (default: minissb's hinted prompt)")
    g.add_argument("--answer-rule", default="meaning", choices=["meaning", "exact"],
                   help="right answer = equal by meaning (minissb.grader), or the boxed string equal to the gold string (the original)")
    g.add_argument("--no-gates", action="store_true", help="the quality gates are measured but do not reject (the original has none)")
    g.add_argument("--copy-threshold", type=float_range(0, 1, low_open=True), default=gates.COPY_THRESHOLD,
                   help=f"copy gate: reject a teacher solution when more than this share of its {gates.COPY_NGRAM}-word n-grams (outside the question) is in an attempt or the prompt")
    g.add_argument("--keep-rollouts", action="store_true", help="also store every rollout's text in the records")
    g.add_argument("--seed", type=int_range(0), default=0, help="sampling seed")

    g = p.add_argument_group("stage 2: captured teacher targets")
    g.add_argument("--no-targets", action="store_true", help="do not store the teacher's hidden states (train.py then needs --teacher online)")
    g.add_argument("--targets-bf16", action="store_true", help="store the hidden states in bf16 whatever the dtype the teacher ran in")

    add_recipe_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = parse_with_recipe(build_parser(), argv, "sample")
    from minissb.ssb import sample_main  # after parsing, so --help is instant

    return run_main(lambda: sample_main(args))


if __name__ == "__main__":
    sys.exit(main())
