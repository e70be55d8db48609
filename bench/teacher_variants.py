"""Rerun only the teacher of a finished stage-1 run, once per hinted-prompt variant, on the
same stored rollouts, and count what each variant keeps.

    python sample.py --model M --limit 40 --keep-rollouts --out runs/probe/pairs.jsonl
    python bench/teacher_variants.py --model M --run runs/probe/pairs.jsonl --out variants.json

The run must have been made with --keep-rollouts (the texts of the attempts the teacher is
shown). Every mixed problem of the run (its pairs and its teacher-stage skips) gets the same
correct and wrong attempt and the same teacher seed in every variant, so the variants differ
only in the prompt: attempt order (correct-first, the paper's, or wrong-first) and whether
the gold answer is stated. Prints a table of kept / teacher_wrong / truncated / leak / copy
per variant (a solution can fire several gates; "kept" passed all of them) and writes it
as JSON after each variant; a rerun continues with the variants not yet in that file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minissb import gates  # noqa: E402
from minissb.runs import resolve_dtype_name, torch_device  # noqa: E402
from minissb.data import Problem  # noqa: E402
from minissb.runs import read_jsonl  # noqa: E402
from minissb.engine import Engine, Request  # noqa: E402
from minissb.runs import problem_seed  # noqa: E402
from minissb.model import from_pretrained  # noqa: E402
from minissb.runs import torch_dtype  # noqa: E402
from minissb.ssb import RunFiles, Stage1Options, build_teacher_chat, judge_teacher  # noqa: E402
from minissb.tokenizer import Tokenizer  # noqa: E402

VARIANTS = [("correct-first", False), ("wrong-first", False), ("correct-first", True), ("wrong-first", True)]


def mixed_problems(files: RunFiles) -> list[tuple[Problem, str, str]]:
    """(problem, correct attempt, wrong attempt) for every problem that reached the teacher."""
    out = []
    for rec in read_jsonl(files.pairs) + read_jsonl(files.skipped):
        info = rec.get("rollouts") or {}
        if rec.get("reason") in ("all_correct", "all_wrong", "no_answer") or info.get("correct_index") is None:
            continue
        if "texts" not in info:
            sys.exit(f"error: {files.pairs}: record {rec['id']} has no rollout texts; rerun sample.py with --keep-rollouts")
        problem = Problem(rec["id"], rec["question"], rec["gold"], rec["dataset"])
        out.append((problem, info["texts"][info["correct_index"]], info["texts"][info["wrong_index"]]))
    return sorted(out, key=lambda t: t[0].id)


def run_variant(engine, tok, items, opts: Stage1Options) -> dict:
    counts = {"teacher_solutions": 0, "kept": 0, "teacher_wrong": 0, **{g: 0 for g in gates.GATES}}
    requests = []
    for problem, right, wrong in items:
        chat = build_teacher_chat(problem, right, wrong, opts)
        ids = tok.encode_chat(chat, add_generation_prompt=True)
        requests.append(Request(ids, opts.teacher_max_new_tokens, 1, opts.teacher_temperature, opts.top_k, opts.top_p,
                                opts.repetition_penalty, seed=problem_seed(opts.seed, "teacher", problem.id),
                                tag=(problem, chat, right, wrong)))
    tokens = 0
    for out in engine.run(requests):
        problem, chat, right, wrong = out.request.tag
        comp = out.completions[0]
        tokens += len(comp.token_ids)
        reason, _, result = judge_teacher(problem, tok.decode(comp.token_ids), comp.finish_reason, chat, right, wrong, opts)
        counts["teacher_solutions"] += 1
        if reason in (None, "teacher_wrong"):  # otherwise a gate rejected it: counted below
            counts["kept" if reason is None else reason] += 1
        for g in result.fired:
            counts[g] += 1
    counts["tokens"] = tokens
    return counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--run", required=True, help="pairs file of a stage-1 run made with --keep-rollouts")
    p.add_argument("--out", required=True, help="JSON file for the table")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64, help="engine slots")
    args = p.parse_args()

    files = RunFiles(Path(args.run))
    config = json.loads(files.run_config.read_text())
    opts = Stage1Options(**{k: v for k, v in config.items() if k in Stage1Options.__dataclass_fields__})
    items = mixed_problems(files)
    device = torch_device(args.device)
    dtype = resolve_dtype_name(args.dtype, device)
    model, tok = from_pretrained(args.model, dtype=torch_dtype(dtype), device=device), Tokenizer.from_dir(args.model)
    longest = max(len(tok.encode_chat(build_teacher_chat(pr, r, w, replace(opts, hint_gold=True)), add_generation_prompt=True))
                  for pr, r, w in items)
    engine = Engine(model, args.batch_size, longest + opts.teacher_max_new_tokens, stop_ids=tok.stop_ids)
    out = Path(args.out)
    rows = json.loads(out.read_text())["variants"] if out.is_file() else []  # a rerun continues with the variants not yet done
    for order, gold in VARIANTS:
        if any((r["hint_order"], r["hint_gold"]) == (order, gold) for r in rows):
            continue
        t0 = time.perf_counter()
        counts = run_variant(engine, tok, items, replace(opts, hint_order=order, hint_gold=gold))
        rows.append({"hint_order": order, "hint_gold": gold, **counts, "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"run": args.run, "dtype": dtype, "problems": len(items), "variants": rows}, indent=2) + "\n")
    print(f"\n{len(items)} mixed problems of {args.run}; {dtype} on {device}")
    print(f"{'variant':<28} {'kept':>5} {'wrong':>6} {'trunc':>6} {'leak':>5} {'copy':>5}")
    for r in rows:
        name = r["hint_order"] + (" + gold" if r["hint_gold"] else "")
        print(f"{name:<28} {r['kept']:>5} {r['teacher_wrong']:>6} {r['truncated']:>6} {r['leak']:>5} {r['copy']:>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
