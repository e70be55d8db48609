"""SSB stage 4: accuracy of a base model and its LoRA adapters on GSM8K, MATH-500 and AIME 2024.

Every model sees exactly what the student saw in training: prompts.student_chat(question)
rendered with the Qwen2.5 chat template and the generation prompt. Greedy decoding gives
pass@1. With k samples at a temperature, each problem gets

    avg@k  its share of correct samples (the mean over problems is the accuracy), and
    maj@k  whether the majority answer is right: answers vote in groups of equivalent answers
           (grader.group_answers); a sample with no extracted answer does not vote; a tie goes to
           the tied answer seen first (lowest sample index); no votes at all counts as wrong.

Intervals are 95% Wilson score intervals, treating the n problems as n Bernoulli trials with
the observed accuracy (for avg@k this ignores that averaging k samples per problem lowers the
variance, so the interval is a little wide).

Files, for each (model or adapter) x dataset, in the output directory:
    <label>__<dataset>.jsonl      one record per problem: every response, its extracted answer,
                                  verdict, length in tokens and finish reason, plus the vote
    <label>__<dataset>.run.json   the generation arguments: a restart must match them
    results.json                  the metrics table as JSON
Records are appended and fsynced one problem at a time, so a killed run is continued by
running the same command again (a half-written last line is dropped). At the end of each
session a responses file is rewritten in problem order. Metrics are always computed from the
records on disk for the problems asked for, old and new alike.

Under torchrun (minissb.dist) every rank reads the records of each responses file and of its
part files before any rank writes, evaluates every rank-th problem still missing and appends
to its own part (base__gsm8k.rank1.jsonl); once every rank is done with a file, rank 0 merges
it in problem order and computes the metrics. Greedy decoding and per-problem seeds make each
record independent of what shared the engine with it, so the files are the ones one process
writes. The session numbers of a row (generated problems, tokens, seconds) are summed over
ranks: generation_seconds are then rank-seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from minissb import dist, grader, prompts
from minissb.data import DATASETS, Problem, data_file, load_problems
from minissb.engine import Request
from minissb.runs import (append_jsonl, check_output_dir, check_run_config, file_sha256, model_identity, problem_seed,
                          remove_temp_files)


# New-token caps per dataset. GSM8K solutions of Qwen2.5-Instruct take ~150-400 tokens and
# MATH-500 ones mostly under 1,000 with a long tail; AIME solutions run long and a cut-off one
# scores zero, so AIME gets the most room.
DEFAULT_MAX_NEW_TOKENS = {"gsm8k": 1024, "math500": 2048, "aime24": 4096}

Z_95 = 1.959963984540054  # two-sided 95% normal quantile



# ----------------------------------------------------------------------------- metrics


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion successes / n: the p with |p_hat - p| <= z sqrt(p(1-p)/n).

    Unlike p_hat +- z sqrt(p_hat(1-p_hat)/n) it stays inside [0, 1] and is not zero-width at
    0/n or n/n, which matters for 30 AIME problems. n = 0 gives the uninformative (0, 1).
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def majority_vote(answers: Sequence[str | None], dataset: str) -> int | None:
    """Index of the sample whose answer wins the vote, or None when no sample has an answer.

    Answers vote by meaning (grader.group_answers: "1,000" and "1000" are one answer); a
    sample with no answer does not vote; the largest group wins, among tied groups the one
    whose first sample comes first, and the returned index is that group's first sample."""
    groups = grader.group_answers(list(answers), dataset)
    return max(groups, key=len)[0] if groups else None  # max keeps the first of equal lengths


def score_responses(texts: Sequence[str], gold: str, dataset: str, finished: Sequence[bool] | None = None
                    ) -> tuple[list[str | None], list[bool], int | None]:
    """(extracted answers, verdicts, index of the majority-vote winner) for one problem's samples.

    finished[i] False: response i was cut off by the token limit, so only a \\boxed{} answer
    counts for it (a cut-off "the answer to part one is 14" is not a final answer)."""
    finished = [True] * len(texts) if finished is None else finished
    answers = [grader.extract_answer(t, dataset, finished=f) for t, f in zip(texts, finished)]
    correct = [a is not None and grader.is_equivalent(a, gold, dataset) for a in answers]
    return answers, correct, majority_vote(answers, dataset)


def summarize(records: Sequence[dict]) -> dict:
    """Metrics over problem records (each with "responses": [{"correct", "tokens", "answer", "finish_reason"}]
    and "maj_correct").

    accuracy = mean over problems of the share of correct samples: pass@1 for one greedy
    sample, avg@k for k samples. maj_accuracy = share of problems whose majority answer is right.
    """
    n = len(records)
    per_problem = [sum(r["correct"] for r in rec["responses"]) / len(rec["responses"]) for rec in records]
    responses = [r for rec in records for r in rec["responses"]]
    acc_sum = sum(per_problem)
    maj_sum = sum(bool(rec["maj_correct"]) for rec in records)
    return {
        "problems": n,
        "problem_scores": per_problem,  # in the order of `records`: pairs models problem by problem
        "samples": len(responses) // n if n else 0,
        "accuracy": acc_sum / n if n else 0.0,
        "ci95": list(wilson_interval(acc_sum, n)),
        "maj_accuracy": maj_sum / n if n else 0.0,
        "maj_ci95": list(wilson_interval(maj_sum, n)),
        "mean_tokens": sum(r["tokens"] for r in responses) / len(responses) if responses else 0.0,
        "no_answer_rate": sum(r["answer"] is None for r in responses) / len(responses) if responses else 0.0,
        "truncated_rate": sum(r["finish_reason"] == "length" for r in responses) / len(responses) if responses else 0.0,
    }


# ----------------------------------------------------------------------------- data


def load_eval_problems(
    datasets: Sequence[str],
    data_dir: str | os.PathLike | None = None,
    data_files: dict[str, str] | None = None,
    limit: int | None = None,
) -> dict[str, list[Problem]]:
    """The evaluation split of each dataset: GSM8K test, MATH-500 test, AIME 2024 (its one split).

    data_files[dataset] (a file or a hub-mirror folder) wins over data_dir (a folder of mirrors
    named owner__name, like shared/data); with neither the files come from the hub.
    """
    data_files = data_files or {}
    unknown = [d for d in (*datasets, *data_files) if d not in DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset {unknown[0]!r}: choose from {', '.join(DATASETS)}")
    if not datasets:
        raise ValueError(f"no dataset given: choose from {', '.join(DATASETS)}")
    out = {}
    for name in datasets:
        source = data_files.get(name, data_dir)
        problems = load_problems(name, source=source, limit=limit)
        if not problems:
            raise ValueError(f"{name}: no problems to evaluate (source {source or 'hub'}, limit {limit})")
        seen = set()
        for p in problems:
            if p.id in seen:
                raise ValueError(f"{name}: problem id {p.id!r} occurs twice in {source or 'the hub file'}; records are keyed by id")
            seen.add(p.id)
        out[name] = problems
    return out


# ----------------------------------------------------------------------------- run files


@dataclass
class EvalTarget:
    """One thing to evaluate: the base model (adapter None) or the base model + one adapter."""

    label: str  # names the output files and the table row
    adapter: Path | None = None


def make_targets(adapters: Sequence[str], include_base: bool = True) -> list[EvalTarget]:
    """Base first, then each adapter. An adapter is DIR or LABEL=DIR; the label defaults to the
    folder name (with its parent's name in front where two would clash)."""
    targets = [EvalTarget("base")] if include_base else []
    parsed = []
    for spec in adapters:
        label, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():
            label, path = "", spec
        parsed.append((label, Path(path).expanduser()))
    names = [lbl or p.resolve().name for lbl, p in parsed]
    for i, (lbl, path) in enumerate(parsed):
        name = names[i]
        if not lbl and (names.count(name) > 1 or name == "base"):
            name = f"{path.resolve().parent.name}-{name}"
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "adapter"
        if name in [t.label for t in targets]:
            name = f"{name}-{i + 1}"
        targets.append(EvalTarget(name, path))
    if not targets:
        raise ValueError("nothing to evaluate: --no-base needs at least one --adapter")
    return targets


@dataclass
class Plan:
    """One responses file to fill: a target on a dataset with its generation arguments."""

    target: EvalTarget
    dataset: str
    responses: Path
    config_path: Path
    config: dict
    gen: dict
    todo: bool  # some asked-for problem has no record yet
    done: frozenset[str] = frozenset()  # ids with a record when the run started (output or a part)


def response_files(out_dir: Path, label: str, dataset: str) -> tuple[Path, Path]:
    stem = f"{label}__{dataset}"
    return out_dir / f"{stem}.jsonl", out_dir / f"{stem}.run.json"


def run_config(model: str, target: EvalTarget, dataset: str, data_source, dtype: str, gen: dict,
               data_sha256: str | None = None) -> dict:
    """What identifies a responses file: everything that changes its records (not how many or how fast)."""
    adapter_digest = None
    if target.adapter is not None:
        weights = target.adapter / "adapter_model.safetensors"
        adapter_digest = file_sha256(weights)[:16] if weights.is_file() else None
    return {
        "model": model_identity(model),
        "adapter": model_identity(target.adapter),
        "adapter_sha256": adapter_digest,  # a retrained adapter in the same folder is a new run
        "dataset": dataset,
        "data": model_identity(data_source),
        "data_sha256": data_sha256,  # the file's content: edited in place, it is a new run
        "dtype": dtype,
        "system_prompt_sha256": hashlib.sha256(prompts.SYSTEM_PROMPT.encode()).hexdigest()[:16],
        **gen,
    }


def read_records(responses: Path) -> dict[str, dict]:
    """Problem records already in a responses file and in its part files (torchrun), by problem id."""

    def check(path: Path, n: int, rec: dict) -> None:
        if not isinstance(rec.get("id"), str) or not isinstance(rec.get("responses"), list):
            raise ValueError(f"{path}: record {n} has no 'id' or 'responses': not written by eval.py?")

    return {rec["id"]: rec for rec in dist.read_all(responses, check)}


# ----------------------------------------------------------------------------- running


def eval_max_len(tokenizer, problems: Sequence[Problem], gen: dict) -> int:
    """Engine positions per slot: the longest student prompt + the new-token cap."""
    chats = (prompts.student_chat(p.question, gen.get("system_prompt")) for p in problems)
    return max(len(tokenizer.encode_chat(c, add_generation_prompt=True)) for c in chats) + gen["max_new_tokens"]


def evaluate_dataset(
    problems: Sequence[Problem],
    tokenizer,
    engine,
    responses: Path,
    gen: dict,
    progress: bool = True,
    desc: str = "eval",
) -> dict:
    """Generate and grade the problems that have no record in `responses` yet, streaming them
    through `engine` (a minissb.engine.Engine, or anything with its run()) and appending one
    record per problem as soon as its samples are done. Returns {"new_problems",
    "new_tokens", "seconds"} for this session."""
    from tqdm.auto import tqdm

    done = read_records(responses)
    todo = [p for p in problems if p.id not in done]
    stats = {"new_problems": len(todo), "new_tokens": 0, "seconds": 0.0}
    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=desc, unit="problem",
               disable=not progress, dynamic_ncols=True)
    requests = (
        Request(tokenizer.encode_chat(prompts.student_chat(p.question, gen.get("system_prompt")), add_generation_prompt=True), gen["max_new_tokens"],
                gen["samples"], gen["temperature"], gen["top_k"], gen["top_p"], seed=problem_seed(gen["seed"], "eval", p.id), tag=p)
        for p in todo
    )
    t0 = time.perf_counter()
    for out in engine.run(requests):
        problem, rows = out.request.tag, out.completions
        texts = [c.text if getattr(c, "text", None) is not None else tokenizer.decode(c.token_ids) for c in rows]
        answers, correct, winner = score_responses(texts, problem.gold, problem.dataset, [c.finish_reason == "stop" for c in rows])
        stats["new_tokens"] += sum(len(c.token_ids) for c in rows)
        append_jsonl(responses, [{  # one line per problem, flushed and fsynced
            "id": problem.id,
            "dataset": problem.dataset,
            "gold": problem.gold,
            "question": problem.question,
            "responses": [
                {"text": t, "answer": a, "correct": ok, "tokens": len(c.token_ids), "finish_reason": c.finish_reason}
                for t, a, ok, c in zip(texts, answers, correct, rows)
            ],
            "maj_answer": None if winner is None else answers[winner],
            "maj_correct": winner is not None and correct[winner],
        }])
        bar.update(1)
    stats["seconds"] = time.perf_counter() - t0
    bar.close()
    return stats


# ----------------------------------------------------------------------------- table


def format_table(results: Sequence[dict]) -> str:
    """Plain-text table: one row per dataset x model, accuracy in % with its 95% Wilson interval."""
    k = max((r["samples"] for r in results), default=1)
    acc_name = "pass@1" if k == 1 else f"avg@{k}"
    header = ["dataset", "model", "problems", f"{acc_name} % [95% CI]"]
    if k > 1:
        header.append(f"maj@{k} % [95% CI]")
    header += ["mean tokens", "vs base (pts) [paired 95% CI]"]
    rows = []
    for r in results:
        lo, hi = r["ci95"]
        row = [r["dataset"], r["model"], str(r["problems"]), f"{100 * r['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"]
        if k > 1:
            mlo, mhi = r["maj_ci95"]
            row.append(f"{100 * r['maj_accuracy']:.1f} [{100 * mlo:.1f}, {100 * mhi:.1f}]")
        d, paired = r.get("delta_vs_base"), r.get("paired_vs_base")
        vs = "-" if d is None else f"{100 * d:+.1f}"
        if paired:
            lo, hi = paired["ci95"]
            vs += f" [{100 * lo:+.1f}, {100 * hi:+.1f}]" + (f" p={paired['mcnemar_exact_p']:.2g}" if "mcnemar_exact_p" in paired else "")
        row += [f"{r['mean_tokens']:.0f}", vs]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    return "\n".join(lines)


def table_legend(samples: int) -> str:
    acc = "pass@1 = share of problems the greedy answer gets right" if samples == 1 else (
        f"avg@{samples} = mean share of the {samples} samples that are right; maj@{samples} = share of problems "
        "whose majority answer is right (equivalent answers vote together, no answer = no vote, ties go to the answer seen first)")
    return (f"{acc}. In %, with its 95% Wilson score interval. mean tokens = generated tokens per response. "
            "vs base = difference to the base model, in percentage points, with a paired bootstrap 95% interval over "
            "the same problems (and, for pass@1, the exact McNemar p-value).")


BOOTSTRAP_RESAMPLES = 10_000


def paired_difference(base: Sequence[float], other: Sequence[float], seed: int = 0) -> dict:
    """The difference other - base over the same problems, with a paired 95% interval.

    base[i], other[i]: the two models' scores on problem i (0/1 for greedy, a share for
    avg@k). The interval is a paired bootstrap (problems resampled with replacement, the
    2.5th and 97.5th percentiles of the mean difference, 10,000 resamples, fixed seed): it
    uses that both models answered the same problems, so it is much narrower than two
    independent Wilson intervals. For 0/1 scores also the exact two-sided McNemar test on
    the discordant problems (b: only base right, c: only the other right)."""
    import numpy as np

    d = np.asarray(other, dtype=float) - np.asarray(base, dtype=float)
    n = len(d)
    out = {"delta": float(d.mean()) if n else 0.0, "ci95": [0.0, 0.0], "method": "paired bootstrap, 10,000 resamples"}
    if n:
        rng = np.random.default_rng(seed)
        means = d[rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))].mean(axis=1)
        out["ci95"] = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    if all(x in (0, 1) for x in (*base, *other)):
        b = int(sum(x == 1 and y == 0 for x, y in zip(base, other)))
        c = int(sum(x == 0 and y == 1 for x, y in zip(base, other)))
        tail = sum(math.comb(b + c, i) for i in range(min(b, c) + 1)) / 2 ** (b + c) if b + c else 1.0
        out.update(only_base_right=b, only_other_right=c, mcnemar_exact_p=min(1.0, 2 * tail))
    return out


def add_deltas(results: list[dict]) -> None:
    """delta_vs_base: accuracy minus the base model's on the same dataset (None for base / no
    base), and paired_vs_base: that difference with its paired interval (paired_difference)."""
    base = {r["dataset"]: r for r in results if r["adapter"] is None}
    for r in results:
        b = base.get(r["dataset"])
        same = b is not None and r is not b and b["problems"] == r["problems"]
        r["delta_vs_base"] = r["accuracy"] - b["accuracy"] if same else None
        r["maj_delta_vs_base"] = r["maj_accuracy"] - b["maj_accuracy"] if same else None
        r["paired_vs_base"] = paired_difference(b["problem_scores"], r["problem_scores"]) if same else None


# ----------------------------------------------------------------------------- the command


def parse_data_files(specs: Sequence[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise ValueError(f"--data {spec!r}: write DATASET=PATH, e.g. gsm8k=data/gsm8k_test.jsonl")
        out[name.strip()] = path
    return out


def check_options(args) -> tuple[list[str], dict[str, str], int | None, float | None]:
    """(datasets, data files, top_k, top_p) from eval.py's options, checked against each other
    (eval.py's argparse types have checked each one's range) before anything loads or is written."""
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    twice = next((d for i, d in enumerate(datasets) if d in datasets[:i]), None)
    if twice:
        raise ValueError(f"--datasets names {twice} twice: list each dataset once")
    data_files = parse_data_files(args.data or [])
    if args.samples > 1 and args.temperature == 0:
        raise ValueError(f"--samples {args.samples} with greedy decoding gives {args.samples} identical answers: set --temperature (e.g. 0.6)")
    check_output_dir(args.out)
    # Filters only apply when sampling; top-k 0 and top-p 1 mean off.
    top_k = args.top_k if args.top_k and args.temperature > 0 else None
    top_p = args.top_p if args.top_p is not None and args.top_p < 1 and args.temperature > 0 else None
    return datasets, data_files, top_k, top_p


def check_adapters_fit(model_dir: Path, targets: Sequence[EvalTarget], base_model: str | None = None) -> None:
    """Load each adapter into a weightless (meta-device) copy of the model, so a missing file or
    a shape mismatch stops the run before any model is loaded or evaluated; an adapter whose
    config names another base model than `base_model` gets a warning."""
    import torch

    from minissb.lora import load_adapter
    from minissb.model import Qwen2ForCausalLM, load_config

    cfg = load_config(model_dir)
    for t in targets:
        if t.adapter is None:
            continue
        with torch.device("meta"):
            skeleton = Qwen2ForCausalLM(cfg)
        load_adapter(skeleton, t.adapter, base_model=base_model)


def plan_runs(args, targets: Sequence[EvalTarget], problems: dict[str, list[Problem]], data_files: dict[str, str],
              dtype_name: str, top_k, top_p, system_prompt: str | None) -> list[Plan]:
    """One Plan per target x dataset, each checked against the run.json of an earlier run into
    the same --out (other arguments are refused) before anything is generated."""
    out_dir = Path(args.out)
    plans = []
    for t in targets:
        for name, probs in problems.items():
            gen = {"samples": args.samples, "temperature": args.temperature, "top_k": top_k, "top_p": top_p,
                   "max_new_tokens": args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[name], "seed": args.seed}
            if system_prompt is not None:  # part of the run's identity only when it is not ours
                gen["system_prompt"] = system_prompt
            source = data_files.get(name, args.data_dir)
            data_sha = file_sha256(data_file(name, source=source))[:16]  # the content: a file edited in place is another run
            responses, config_path = response_files(out_dir, t.label, name)
            config = run_config(args.model, t, name, source, dtype_name, gen, data_sha)
            check_run_config(config_path, config, [responses, *dist.part_files(responses)],
                             ignore=("seed",) if args.temperature == 0 else ())  # greedy: no seed
            done = frozenset(read_records(responses))
            plans.append(Plan(t, name, responses, config_path, config, gen, any(p.id not in done for p in probs), done))
    return plans


def tidy_outputs(out_dir: Path, plans: Sequence[Plan]) -> None:
    """Before a run writes (rank 0): remove what a killed one left, temporaries of a write and done notes of its ranks."""
    remove_temp_files(out_dir)
    for plan in plans:
        dist.clear_done(plan.responses)


def finish_plan(world: dist.World, plan: Plan, problems: Sequence[Problem], session: dict) -> dict | None:
    """After a rank's share of a plan (its session numbers): rank 0 waits for every rank's done
    note, rewrites the responses file from it and its parts in problem order, and returns the
    numbers summed over ranks; the other ranks get None and go on with the next plan."""
    if plan.todo:
        sessions = dist.wait_for_ranks(world, plan.responses, session)
        if sessions is None:
            return None
        session = {k: sum(s[k] for s in sessions) for k in session}
    elif not world.is_main:
        return None
    dist.merge(plan.responses, [p.id for p in problems])  # a file already in order with no parts stays as it is
    return session


def earlier_rows(results_path: Path) -> dict[str, dict]:
    """The rows of the results.json an earlier session of this --out wrote, by responses file
    (none if there is no such file or it cannot be read: only earlier speed numbers are lost)."""
    try:
        rows = json.loads(results_path.read_text())["results"]
        return {r["responses_file"]: r for r in rows}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def result_row(plan: Plan, problems: Sequence[Problem], session: dict, earlier: dict | None = None) -> dict:
    """The table row of one plan: the metrics over its problems' records, and the generation
    numbers of this session added to those of the earlier sessions that wrote results.json
    (`earlier`, their row), so a resumed or repeated run keeps what was measured before."""
    records = read_records(plan.responses)
    if earlier and plan.done:  # records written before this session: the earlier row measured them
        session = {"new_problems": session["new_problems"] + earlier.get("generated_problems", 0),
                   "new_tokens": session["new_tokens"] + earlier.get("generated_tokens", 0),
                   "seconds": session["seconds"] + earlier.get("generation_seconds", 0.0)}
    seconds = round(session["seconds"], 2)  # the speed from the stored seconds: a rerun computes the same
    tps = session["new_tokens"] / seconds if seconds else None
    return {
        "dataset": plan.dataset,
        "model": plan.target.label,
        "adapter": str(plan.target.adapter) if plan.target.adapter is not None else None,
        **summarize([records[p.id] for p in problems]),
        "max_new_tokens": plan.gen["max_new_tokens"],
        "responses_file": plan.responses.name,
        "generated_problems": session["new_problems"],
        "generated_tokens": session["new_tokens"],
        "generation_seconds": seconds,
        "tokens_per_s": round(tps, 1) if tps else None,
    }


__all__ = [
    "EvalTarget",
    "DEFAULT_MAX_NEW_TOKENS",
    "wilson_interval",
    "majority_vote",
    "score_responses",
    "summarize",
    "load_eval_problems",
    "make_targets",
    "evaluate_dataset",
    "format_table",
    "table_legend",
    "add_deltas",
    "Plan",
    "plan_runs",
    "earlier_rows",
    "result_row",
    "finish_plan",
    "tidy_outputs",
    "check_options",
    "check_adapters_fit",
    "eval_max_len",
]
