"""SSB stage 1: rollouts -> a correct and a wrong attempt -> hinted teacher solution -> checked pair.

For each training problem, in data order and many problems per batch:

1. sample K rollouts of the student chat (system prompt + bare question);
2. grade them; a problem needs at least one correct and one wrong answer, otherwise it is
   skipped as all_correct, all_wrong or no_answer (a rollout with no extracted answer is
   neither right nor wrong);
3. pick one correct rollout and one rollout with the most common wrong answer (answers that
   are equivalent count as one, via grader.answer_key; ties are broken by a seeded draw);
4. show both to the same model in the hinted teacher prompt and sample its solution;
5. keep the pair if the solution's answer is right and it passes the quality gates
   (minissb.gates: truncated, leak, copy); otherwise record why it was skipped.

Generation is a function passed in (`GenerateFn`), so the stage logic is tested with a
scripted generator that returns chosen texts; `model_generate_fn` wraps minissb.generate.

Crash safety. Every finished problem gets exactly one line, in the pairs file or in the
skipped file, appended and fsynced as soon as it is decided (skips right after grading,
pairs after the teacher), so a run killed at any point - SIGKILL included - loses only the
problems still in flight. A restart with the same arguments reads both files, cuts off a
half-written last line, and continues with the problems that have no record. The run's
arguments are stored in `<stem>.run.json` beside the outputs; a restart with different
arguments refuses instead of mixing two runs in one file.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from minissb import gates, grader, prompts
from minissb.data import Problem, append_jsonl, config_differences, read_jsonl, write_json_atomic


class SSBError(ValueError):
    """A stage-1 run cannot start or continue; the message says what to fix."""


# Skip reasons, in the order a problem can fail.
ROLLOUT_SKIPS = ("all_correct", "all_wrong", "no_answer")
TEACHER_SKIPS = ("teacher_wrong", *gates.GATES)

# generate_fn(prompts, *, num_samples, temperature, top_k, max_new_tokens, seed) -> completions,
# prompt-major (row i*num_samples + j), each with .token_ids, .finish_reason ("stop" | "length").
GenerateFn = Callable[..., list]


@dataclass
class Stage1Options:
    num_rollouts: int = 4  # K, paper: 4
    rollout_temperature: float = 0.8  # paper: 0.8
    top_k: int | None = 50  # paper: 50, for rollouts and teacher alike
    teacher_temperature: float = 0.4  # paper: 0.4
    max_new_tokens: int = 1024  # rollouts; GSM8K solutions of Qwen2.5 are ~150-400 tokens
    teacher_max_new_tokens: int = 1024
    hint_order: str = "correct-first"  # the paper's order; or "wrong-first"
    hint_gold: bool = False  # also state the gold answer in the teacher prompt
    copy_threshold: float = gates.COPY_THRESHOLD
    seed: int = 0
    # Not part of the run identity: these may change between restarts.
    num_pairs: int = 256  # stop after this many kept pairs (paper: 256)
    batch_size: int = 16  # problems per generation batch (x K rollout rows)
    keep_rollouts: bool = False  # also store every rollout's text in the records

    def validate(self) -> None:
        if self.num_rollouts < 2:
            raise SSBError(f"--k {self.num_rollouts}: need at least 2 rollouts to find a correct and a wrong one")
        for name in ("rollout_temperature", "teacher_temperature"):
            if getattr(self, name) < 0:
                raise SSBError(f"--{name.replace('_', '-')} must be >= 0 (0 = greedy), got {getattr(self, name)}")
        if self.top_k is not None and self.top_k < 1:
            raise SSBError(f"--top-k must be >= 1 (or 0 for no top-k filter), got {self.top_k}")
        for name in ("max_new_tokens", "teacher_max_new_tokens", "num_pairs", "batch_size"):
            if getattr(self, name) < 1:
                raise SSBError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.hint_order not in ("correct-first", "wrong-first"):
            raise SSBError(f"--hint-order must be correct-first or wrong-first, got {self.hint_order!r}")
        if not 0 < self.copy_threshold <= 1:
            raise SSBError(f"--copy-threshold must be in (0, 1], got {self.copy_threshold}")


# Options that may change when a run is restarted (how much, how fast, what is logged).
RESTARTABLE = ("num_pairs", "batch_size", "keep_rollouts")


# ----------------------------------------------------------------------------- pair selection


@dataclass
class Selection:
    """Graded rollouts of one problem and the two picked for the teacher (reason None = mixed)."""

    reason: str | None  # None, "all_correct", "all_wrong" or "no_answer"
    answers: list[str | None]
    correct: list[bool]
    correct_index: int | None = None
    wrong_index: int | None = None
    wrong_answer: str | None = None

    @property
    def n_correct(self) -> int:
        return sum(self.correct)

    @property
    def n_no_answer(self) -> int:
        return sum(a is None for a in self.answers)

    @property
    def n_wrong(self) -> int:
        return len(self.answers) - self.n_correct - self.n_no_answer

    def to_dict(self) -> dict:
        return {
            "k": len(self.answers),
            "n_correct": self.n_correct,
            "n_wrong": self.n_wrong,
            "n_no_answer": self.n_no_answer,
            "answers": self.answers,
            "correct_index": self.correct_index,
            "wrong_index": self.wrong_index,
            "wrong_answer": self.wrong_answer,
        }


def grade_rollouts(texts: Sequence[str], gold: str, dataset: str) -> tuple[list[str | None], list[bool]]:
    """Extracted answers (None = no answer) and correctness of each rollout."""
    answers = [grader.extract_answer(t, dataset) for t in texts]
    correct = [a is not None and grader.is_equivalent(a, gold, dataset) for a in answers]
    return answers, correct


def select_pair(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    dataset: str,
    rng: random.Random,
    finished: Sequence[bool] | None = None,
) -> Selection:
    """Pick one correct rollout and one carrying the most common wrong answer.

    Wrong answers are grouped by grader.answer_key ("1,000", "1000.0" and "$1000" are one
    answer); the biggest group wins, ties drawn with `rng`. Within the chosen groups a
    rollout that ended on its own (`finished`) is preferred to one cut by the token limit.
    """
    answers, correct = list(answers), list(correct)
    sel = Selection(reason=None, answers=answers, correct=correct)
    wrong = [i for i, (a, c) in enumerate(zip(answers, correct)) if a is not None and not c]
    right = [i for i, c in enumerate(correct) if c]
    if right and not wrong:
        sel.reason = "all_correct"
    elif wrong and not right:
        sel.reason = "all_wrong"
    elif not right and not wrong:
        sel.reason = "no_answer"
    if sel.reason:
        return sel

    groups: dict[str, list[int]] = {}
    for i in wrong:
        groups.setdefault(grader.answer_key(answers[i], dataset), []).append(i)
    top = max(len(g) for g in groups.values())
    tied = sorted(key for key, g in groups.items() if len(g) == top)  # sorted: the draw depends on rng only
    wrong_group = groups[rng.choice(tied)]

    def pick(indices: list[int]) -> int:
        done = [i for i in indices if finished is None or finished[i]]
        return rng.choice(done or indices)

    sel.correct_index = pick(right)
    sel.wrong_index = pick(wrong_group)
    sel.wrong_answer = answers[sel.wrong_index]
    return sel


def problem_rng(seed: int, problem_id: str) -> random.Random:
    """A random stream per problem: picks do not depend on batching or on restarts."""
    return random.Random(f"{seed}:{problem_id}")


def batch_seed(seed: int, tag: str, ids: Sequence[str]) -> int:
    """Sampling seed for one generation call, derived from the run seed and the problems in it."""
    digest = hashlib.sha256(f"{seed}:{tag}:{','.join(ids)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def build_teacher_chat(problem: Problem, correct_text: str, wrong_text: str, opts: Stage1Options) -> list[dict]:
    return prompts.teacher_chat(
        problem.question,
        correct_text,
        wrong_text,
        wrong_first=opts.hint_order == "wrong-first",
        gold=problem.gold if opts.hint_gold else None,
    )


def judge_teacher(
    problem: Problem, solution: str, finish_reason: str, teacher_chat: list[dict], correct_text: str, wrong_text: str, opts: Stage1Options
) -> tuple[str | None, str | None, gates.GateResult]:
    """(skip reason or None to keep, the teacher's extracted answer, gate results).

    The answer check comes first; the gates run on every solution (so their firing rates are
    measured on all teacher outputs) and decide only for solutions with the right answer.
    """
    answer = grader.extract_answer(solution, problem.dataset)
    right = answer is not None and grader.is_equivalent(answer, problem.gold, problem.dataset)
    references = {"correct": correct_text, "wrong": wrong_text, "prompt": teacher_chat[-1]["content"]}
    result = gates.check_solution(solution, finish_reason, problem.question, references, opts.copy_threshold)
    if not right:
        return "teacher_wrong", answer, result
    return (result.fired[0] if result.fired else None), answer, result


# ----------------------------------------------------------------------------- run files


@dataclass
class RunFiles:
    """Everything a run writes, named after the pairs file: runs/x/pairs.jsonl -> pairs.*"""

    pairs: Path

    @property
    def stem(self) -> Path:
        return self.pairs.with_suffix("") if self.pairs.suffix == ".jsonl" else self.pairs

    @property
    def skipped(self) -> Path:
        return self.stem.with_name(self.stem.name + ".skipped.jsonl")

    @property
    def run_config(self) -> Path:
        return self.stem.with_name(self.stem.name + ".run.json")

    @property
    def summary(self) -> Path:
        return self.stem.with_name(self.stem.name + ".summary.json")

    @property
    def targets(self) -> Path:
        return self.stem.with_name(self.stem.name + ".targets")


def check_run_config(files: RunFiles, config: dict) -> bool:
    """Refuse to continue a run made with other arguments. True if the run is new."""
    path = files.run_config
    if not path.is_file():
        for existing in (files.pairs, files.skipped):
            if existing.is_file() and existing.stat().st_size > 0:
                raise SSBError(
                    f"{existing} exists but {path.name} does not, so it cannot be told apart from another run: "
                    f"pass a new --out, or move the old files away"
                )
        return True
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SSBError(f"{path}: not valid JSON ({e}); it records the arguments of the run in {files.pairs.name}") from None
    shown = config_differences(stored, config)
    if shown:
        raise SSBError(
            f"{files.pairs} belongs to a run with other arguments ({shown}): rerun with the same arguments "
            f"to continue it, or pass a new --out"
        )
    return False


def read_done(files: RunFiles) -> tuple[list[dict], list[dict]]:
    """The records already written (pairs, skipped), checked for the fields a resume needs."""
    out = []
    for path in (files.pairs, files.skipped):
        records = read_jsonl(path) if path.is_file() else []
        for n, rec in enumerate(records, start=1):
            if not isinstance(rec.get("id"), str) or (path == files.skipped and "reason" not in rec):
                raise SSBError(f"{path}: record {n} has no 'id'{' or reason' if path == files.skipped else ''}: not written by sample.py?")
        out.append(records)
    return out[0], out[1]


# ----------------------------------------------------------------------------- the run


class RunStats:
    """Counts for the run summary; rebuilt from the files on restart, so they cover the whole run."""

    def __init__(self, pairs: list[dict], skipped: list[dict], previous: dict | None):
        self.pairs = len(pairs)
        self.skipped = Counter(r["reason"] for r in skipped)
        self.gates_fired = Counter()
        for r in (*pairs, *skipped):
            for g in (r.get("gates") or {}).get("fired", []):
                self.gates_fired[g] += 1
        self.teacher_solutions = self.pairs + sum(self.skipped[r] for r in TEACHER_SKIPS)
        prev = previous or {}
        self.rollout_tokens = int(prev.get("rollout_tokens", 0))
        self.teacher_tokens = int(prev.get("teacher_tokens", 0))
        self.generation_seconds = float(prev.get("generation_seconds", 0.0))
        self.sessions = int(prev.get("sessions", 0)) + 1

    def to_dict(self) -> dict:
        tokens = self.rollout_tokens + self.teacher_tokens
        return {
            "problems_seen": self.pairs + sum(self.skipped.values()),
            "pairs_kept": self.pairs,
            "skipped": {r: self.skipped[r] for r in (*ROLLOUT_SKIPS, *TEACHER_SKIPS)},
            "teacher_solutions": self.teacher_solutions,
            "gates_fired": {g: self.gates_fired[g] for g in gates.GATES},
            "rollout_tokens": self.rollout_tokens,
            "teacher_tokens": self.teacher_tokens,
            "tokens_generated": tokens,
            "generation_seconds": round(self.generation_seconds, 2),
            "tokens_per_s": round(tokens / self.generation_seconds, 1) if self.generation_seconds else 0.0,
            "sessions": self.sessions,
        }


def format_summary(summary: dict) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items())
    fired = ", ".join(f"{k} {v}" for k, v in summary["gates_fired"].items())
    return "\n".join(
        [
            f"problems seen:     {summary['problems_seen']}",
            f"pairs kept:        {summary['pairs_kept']}",
            f"skipped:           {skipped}",
            f"teacher solutions: {summary['teacher_solutions']} (gates fired on them: {fired})",
            f"tokens generated:  {summary['tokens_generated']} ({summary['rollout_tokens']} rollouts, "
            f"{summary['teacher_tokens']} teacher) in {summary['generation_seconds']:.1f} s = "
            f"{summary['tokens_per_s']:.1f} tokens/s",
        ]
    )


def _strip_stop(token_ids: Sequence[int], finish_reason: str, stop_ids: Sequence[int]) -> list[int]:
    ids = list(token_ids)
    if finish_reason == "stop" and ids and ids[-1] in stop_ids:
        ids.pop()  # records keep the generated ids without the stop token
    return ids


def run_stage1(
    problems: Sequence[Problem],
    tokenizer,
    generate_fn: GenerateFn,
    files: RunFiles,
    opts: Stage1Options,
    model_name: str,
    progress: bool = True,
) -> dict:
    """Run (or continue) stage 1 over `problems`; returns the run summary (also saved as JSON).

    The caller has checked the run config (check_run_config) before anything is written.
    """
    opts.validate()
    for path in (files.pairs, files.skipped):  # both exist from the start, empty or not, for the next stage
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    pairs, skipped = read_done(files)
    done = {r["id"] for r in pairs} | {r["id"] for r in skipped}
    try:  # the token and time totals of earlier sessions of this run
        previous = json.loads(files.summary.read_text()) if files.summary.is_file() else None
    except json.JSONDecodeError:
        previous = None  # only the totals are lost; the counts come from the records
    stats = RunStats(pairs, skipped, previous)
    todo = [p for p in problems if p.id not in done]
    stop_ids = list(tokenizer.stop_ids)

    def save_summary() -> dict:
        summary = stats.to_dict()
        write_json_atomic(files.summary, summary)
        return summary

    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="stage 1", unit="problem", disable=not progress, dynamic_ncols=True)
    bar.set_postfix(pairs=stats.pairs)
    for start in range(0, len(todo), opts.batch_size):
        if stats.pairs >= opts.num_pairs:
            break
        batch = todo[start : start + opts.batch_size]
        ids = [p.id for p in batch]
        K = opts.num_rollouts

        # 1-2. rollouts of the student chat, graded; non-mixed problems are recorded at once.
        student_prompts = [tokenizer.encode_chat(prompts.student_chat(p.question), add_generation_prompt=True) for p in batch]
        t0 = time.perf_counter()
        rollouts = generate_fn(
            student_prompts,
            num_samples=K,
            temperature=opts.rollout_temperature,
            top_k=opts.top_k,
            max_new_tokens=opts.max_new_tokens,
            seed=batch_seed(opts.seed, "rollouts", ids),
        )
        stats.generation_seconds += time.perf_counter() - t0
        if len(rollouts) != len(batch) * K:
            raise SSBError(f"the generator returned {len(rollouts)} completions for {len(batch)} prompts x {K} samples")
        stats.rollout_tokens += sum(len(c.token_ids) for c in rollouts)

        mixed = []  # (problem, selection, rollout texts)
        for i, problem in enumerate(batch):
            rows = rollouts[i * K : (i + 1) * K]
            texts = [tokenizer.decode(_strip_stop(c.token_ids, c.finish_reason, stop_ids)) for c in rows]
            answers, correct = grade_rollouts(texts, problem.gold, problem.dataset)
            sel = select_pair(answers, correct, problem.dataset, problem_rng(opts.seed, problem.id), [c.finish_reason == "stop" for c in rows])
            rollout_info = sel.to_dict()
            rollout_info["finish_reasons"] = [c.finish_reason for c in rows]
            if opts.keep_rollouts:
                rollout_info["texts"] = texts
            if sel.reason:
                record = {"id": problem.id, "dataset": problem.dataset, "reason": sel.reason, "question": problem.question, "gold": problem.gold, "rollouts": rollout_info}
                append_jsonl(files.skipped, [record])
                stats.skipped[sel.reason] += 1
            else:
                mixed.append((problem, sel, texts, rollout_info))

        # 3-5. teacher solutions for the mixed problems, judged and recorded.
        if mixed:
            chats = [build_teacher_chat(p, texts[sel.correct_index], texts[sel.wrong_index], opts) for p, sel, texts, _ in mixed]
            t0 = time.perf_counter()
            solutions = generate_fn(
                [tokenizer.encode_chat(c, add_generation_prompt=True) for c in chats],
                num_samples=1,
                temperature=opts.teacher_temperature,
                top_k=opts.top_k,
                max_new_tokens=opts.teacher_max_new_tokens,
                seed=batch_seed(opts.seed, "teacher", [p.id for p, *_ in mixed]),
            )
            stats.generation_seconds += time.perf_counter() - t0
            if len(solutions) != len(mixed):
                raise SSBError(f"the generator returned {len(solutions)} teacher solutions for {len(mixed)} prompts")
            stats.teacher_tokens += sum(len(c.token_ids) for c in solutions)
            for (problem, sel, texts, rollout_info), chat, comp in zip(mixed, chats, solutions):
                if stats.pairs >= opts.num_pairs:
                    break  # enough pairs: the rest of the batch stays undone
                solution_ids = _strip_stop(comp.token_ids, comp.finish_reason, stop_ids)
                solution = tokenizer.decode(solution_ids)
                reason, answer, result = judge_teacher(
                    problem, solution, comp.finish_reason, chat, texts[sel.correct_index], texts[sel.wrong_index], opts
                )
                for g in result.fired:
                    stats.gates_fired[g] += 1
                stats.teacher_solutions += 1
                common = {"id": problem.id, "dataset": problem.dataset}
                if reason is None:
                    record = {
                        **common,
                        "question": problem.question,
                        "gold": problem.gold,
                        "student_chat": prompts.student_chat(problem.question),
                        "teacher_chat": chat,
                        "solution": solution,
                        "solution_ids": solution_ids,
                        "finish_reason": comp.finish_reason,
                        "rollouts": rollout_info,
                        "model": model_name,
                        "teacher_answer": answer,
                        "gates": result.to_dict(),
                    }
                    append_jsonl(files.pairs, [record])
                    stats.pairs += 1
                else:
                    record = {
                        **common,
                        "reason": reason,
                        "question": problem.question,
                        "gold": problem.gold,
                        "teacher_answer": answer,
                        "finish_reason": comp.finish_reason,
                        "gates": result.to_dict(),
                        "solution": solution,  # kept so the rejection can be inspected
                        "teacher_chat": chat,
                        "rollouts": rollout_info,
                    }
                    append_jsonl(files.skipped, [record])
                    stats.skipped[reason] += 1
        bar.update(len(batch))
        bar.set_postfix(pairs=stats.pairs)
        save_summary()
    bar.close()
    return save_summary()


def model_generate_fn(model, tokenizer, compile: bool = False, progress: bool = False) -> GenerateFn:
    """The real generator: minissb.generate on `model`, stopping at the tokenizer's stop ids."""
    from minissb.generate import generate

    def generate_fn(prompts_ids, *, num_samples, temperature, top_k, max_new_tokens, seed):
        return generate(
            model,
            prompts_ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            num_samples=num_samples,
            stop_ids=tokenizer.stop_ids,
            seed=seed,
            compile=compile,
            progress=progress,
        )

    return generate_fn


def run_config(opts: Stage1Options, model: str, dtype: str, dataset: str, split: str, data: str | None) -> dict:
    """What identifies a run: everything that changes its records (not how many or how fast)."""
    config = {k: v for k, v in asdict(opts).items() if k not in RESTARTABLE}
    config.update(model=model, dtype=dtype, dataset=dataset, split=split, data=data)
    return config


# ----------------------------------------------------------------------------- sample.py


def _identity(path_or_id: str | None) -> str | None:
    """A local path as an absolute path (restarts from another directory still match); a hub id as is."""
    if path_or_id is None:
        return None
    p = Path(path_or_id).expanduser()
    return str(p.resolve()) if p.exists() else path_or_id


def load_model_and_tokenizer(model_dir: Path, tokenizer_dir: str | None, dtype_name: str, device_name: str):
    from minissb.cli import torch_device, torch_dtype
    from minissb.model import from_pretrained
    from minissb.tokenizer import Tokenizer

    dtype, device = torch_dtype(dtype_name), torch_device(device_name)
    tokenizer = Tokenizer.from_dir(tokenizer_dir or model_dir)
    model = from_pretrained(model_dir, dtype=dtype, device=device)
    return model, tokenizer


def sample_main(args) -> int:
    """sample.py after argument parsing: stage 1, then (optionally) offline teacher targets."""
    from minissb.data import load_problems
    from minissb.targets import format_target_stats, write_targets

    files = RunFiles(Path(args.out))
    progress = not args.no_progress
    opts = Stage1Options(
        num_rollouts=args.num_rollouts,
        rollout_temperature=args.rollout_temperature,
        top_k=args.top_k or None,
        teacher_temperature=args.teacher_temperature,
        max_new_tokens=args.max_new_tokens,
        teacher_max_new_tokens=args.teacher_max_new_tokens or args.max_new_tokens,
        hint_order=args.hint_order,
        hint_gold=args.hint_gold,
        copy_threshold=args.copy_threshold,
        seed=args.seed,
        num_pairs=args.num_pairs,
        batch_size=args.batch_size,
        keep_rollouts=args.keep_rollouts,
    )
    from minissb.model import resolve_model_dir

    model_dir = resolve_model_dir(args.model)  # a missing path fails here, before anything is read or written
    model_name = _identity(args.model)
    if args.targets_only:
        if args.teacher_targets == "none":
            raise SSBError("--targets-only needs --teacher-targets topk or full")
        if not files.pairs.is_file():
            raise SSBError(f"--targets-only: pairs file {files.pairs} not found (run stage 1 first)")
    else:
        opts.validate()
        if args.limit is not None and args.limit < 1:
            raise SSBError(f"--limit must be >= 1, got {args.limit}")
        # Everything that can fail on bad input is checked before the first byte is written.
        problems = load_problems(args.dataset, split=args.split, source=args.data, limit=args.limit)
        config = run_config(opts, model_name, args.dtype, args.dataset, args.split, _identity(args.data))
        new_run = check_run_config(files, config)
        read_done(files)  # a damaged output file fails now, not after the model is loaded

    model, tokenizer = load_model_and_tokenizer(model_dir, args.tokenizer, args.dtype, args.device)

    if not args.targets_only:
        if new_run:
            write_json_atomic(files.run_config, config)
        print(f"stage 1: {len(problems)} problems from {args.dataset}/{args.split}, model {args.model} ({args.dtype} on {model.device})", file=sys.stderr)
        generate_fn = model_generate_fn(model, tokenizer, compile=args.compile)
        summary = run_stage1(problems, tokenizer, generate_fn, files, opts, model_name, progress=progress)
        print(format_summary(summary))
        print(f"wrote {files.pairs}, {files.skipped.name}, {files.summary.name}")

    if args.teacher_targets != "none":
        stats = write_targets(
            model,
            tokenizer,
            files.pairs,
            mode=args.teacher_targets,
            k=args.targets_k,
            temperature=args.targets_temperature,
            model_name=model_name,
            batch_size=args.targets_batch_size,
            chunk_size=args.chunk_size,
            progress=progress,
        )
        print(format_target_stats(stats))
    return 0


__all__ = [
    "SSBError",
    "Stage1Options",
    "Selection",
    "RunFiles",
    "GenerateFn",
    "grade_rollouts",
    "select_pair",
    "judge_teacher",
    "build_teacher_chat",
    "check_run_config",
    "run_stage1",
    "run_config",
    "model_generate_fn",
    "format_summary",
    "sample_main",
]
