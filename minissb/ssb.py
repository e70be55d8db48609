"""SSB stage 1: rollouts -> a correct and a wrong attempt -> hinted teacher solution -> checked pair.

For each training problem, in data order, many problems in flight at once:

1. sample K rollouts of the student chat (system prompt + bare question);
2. grade them; a problem needs at least one correct and one wrong answer, otherwise it is
   skipped as all_correct, all_wrong or no_answer (a rollout with no extracted answer is
   neither right nor wrong);
3. pick one correct rollout and one rollout with the most common wrong answer (answers that
   are equivalent count as one, via grader.answer_key; ties are broken by a seeded draw);
4. show both to the same model in the hinted teacher prompt and sample its solution;
5. keep the pair if the solution's answer is right and it passes the quality gates
   (minissb.gates: truncated, leak, copy); otherwise record why it was skipped.

Problems stream through minissb.engine: a problem's rollouts are graded the moment its K
samples are done and its teacher request goes ahead of new rollouts, so the pool never
waits for a batch. Each problem's samples are seeded by (run seed, problem id) alone, so a
restarted run, or one with another pool size, writes the same records. The engine is passed
in, so the stage logic is tested with a scripted engine that returns chosen texts.

Captured targets: with capture_targets, the teacher's request also returns its final hidden
states, and a kept pair's rows are stored (minissb.targets) before its line is written.

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
from typing import Sequence

import torch

from minissb import gates, grader, prompts
from minissb.data import Problem, append_jsonl, config_differences, read_jsonl, write_json_atomic
from minissb.engine import Request
from minissb.targets import CapturedTargets


class SSBError(ValueError):
    """A stage-1 run cannot start or continue; the message says what to fix."""


# Skip reasons, in the order a problem can fail.
ROLLOUT_SKIPS = ("all_correct", "all_wrong", "no_answer")
TEACHER_SKIPS = ("teacher_wrong", *gates.GATES)



@dataclass
class Stage1Options:
    num_rollouts: int = 4  # K, paper: 4
    rollout_temperature: float = 0.8  # paper: 0.8
    top_k: int | None = 50  # paper: 50, for rollouts and teacher alike
    top_p: float | None = None  # off; the original inherits 0.8 from Qwen2.5's generation_config.json
    repetition_penalty: float = 1.0  # off; the original inherits 1.05 the same way
    teacher_temperature: float = 0.4  # paper: 0.4
    max_new_tokens: int = 1024  # rollouts; GSM8K solutions of Qwen2.5 are ~150-400 tokens
    teacher_max_new_tokens: int = 1024
    hint_order: str = "correct-first"  # the paper's order; or "wrong-first"
    hint_gold: bool = False  # also state the gold answer in the teacher prompt
    copy_threshold: float = gates.COPY_THRESHOLD
    seed: int = 0
    answer_rule: str = "meaning"  # "meaning" (minissb.grader) or "exact" (the boxed string equals the gold string: the original)
    gates: bool = True  # the quality gates (truncated, leak, copy) decide too; the original has none
    system_prompt: str | None = None  # None: prompts.SYSTEM_PROMPT; else a --system-prompt-file's text
    teacher_template: str | None = None  # None: our hinted layout; else a --teacher-prompt-file's text
    capture_targets: bool = True  # store the teacher's hidden states for every kept pair (train.py --teacher captured)
    targets_dtype: str | None = None  # None: the dtype the teacher ran in; "bfloat16" halves the files
    # Not part of the run identity: these may change between restarts.
    num_pairs: int = 256  # stop after this many kept pairs (paper: 256)
    batch_size: int = 64  # the engine's slots: sequences decoded together
    keep_rollouts: bool = False  # also store every rollout's text in the records

    def validate(self) -> None:
        if self.num_rollouts < 2:
            raise SSBError(f"--k {self.num_rollouts}: need at least 2 rollouts to find a correct and a wrong one")
        for name in ("rollout_temperature", "teacher_temperature"):
            if getattr(self, name) < 0:
                raise SSBError(f"--{name.replace('_', '-')} must be >= 0 (0 = greedy), got {getattr(self, name)}")
        if self.top_k is not None and self.top_k < 1:
            raise SSBError(f"--top-k must be >= 1 (or 0 for no top-k filter), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SSBError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty < float("inf"):
            raise SSBError(f"--repetition-penalty must be finite and > 0 (1 = off), got {self.repetition_penalty}")
        if self.batch_size < self.num_rollouts:
            raise SSBError(f"--batch-size {self.batch_size} (engine slots) must be at least --k {self.num_rollouts}")
        for name in ("max_new_tokens", "teacher_max_new_tokens", "num_pairs", "batch_size"):
            if getattr(self, name) < 1:
                raise SSBError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.answer_rule not in ("meaning", "exact"):
            raise SSBError(f"--answer-rule must be meaning or exact, got {self.answer_rule!r}")
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


def is_right(answer: str | None, gold: str, dataset: str, rule: str = "meaning") -> bool:
    """Stage 1's one definition of a right answer: equal by meaning (minissb.grader), or, with
    rule "exact", the boxed string equal to the gold string (the original code's rule)."""
    if answer is None:
        return False
    return answer == gold.strip() if rule == "exact" else grader.is_equivalent(answer, gold, dataset)


def grade_rollouts(texts: Sequence[str], gold: str, dataset: str, rule: str = "meaning") -> tuple[list[str | None], list[bool]]:
    """Extracted answers (None = no answer) and correctness of each rollout.

    Only the last \\boxed{} counts (as in the original code): an answer phrase is not taken,
    since a cut-off "...the answer depends on the number of" would become a wrong answer,
    turn an all-correct problem into a mixed one and be shown to the teacher as the common
    mistake."""
    answers = [grader.extract_answer(t, dataset, fallback=False) for t in texts]
    correct = [is_right(a, gold, dataset, rule) for a in answers]
    return answers, correct


def select_pair(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    dataset: str,
    rng: random.Random,
    finished: Sequence[bool] | None = None,
    rule: str = "meaning",
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
        key = answers[i] if rule == "exact" else grader.answer_key(answers[i], dataset)  # exact: "18.00" is not "18"
        groups.setdefault(key, []).append(i)
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


def build_teacher_chat(problem: Problem, correct_text: str, wrong_text: str, opts: Stage1Options) -> list[dict]:
    return prompts.teacher_chat(
        problem.question,
        correct_text,
        wrong_text,
        wrong_first=opts.hint_order == "wrong-first",
        gold=problem.gold if opts.hint_gold else None,
        system=opts.system_prompt,
        template=opts.teacher_template,
    )


def judge_teacher(
    problem: Problem, solution: str, finish_reason: str, teacher_chat: list[dict], correct_text: str, wrong_text: str, opts: Stage1Options
) -> tuple[str | None, str | None, gates.GateResult]:
    """(skip reason or None to keep, the teacher's extracted answer, gate results).

    The answer check comes first; the gates run on every solution (so their firing rates are
    measured on all teacher outputs) and decide only for solutions with the right answer.
    """
    answer = grader.extract_answer(solution, problem.dataset, fallback=False)  # boxed only, as for rollouts
    right = is_right(answer, problem.gold, problem.dataset, opts.answer_rule)
    references = {"correct": correct_text, "wrong": wrong_text, "prompt": teacher_chat[-1]["content"]}
    result = gates.check_solution(solution, finish_reason, problem.question, references, opts.copy_threshold)
    if not right:
        return "teacher_wrong", answer, result
    if not opts.gates:  # measured and recorded all the same, but they do not decide
        return None, answer, result
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
        self.target_bytes = int(prev.get("target_bytes", 0))
        self.target_rows = int(prev.get("target_rows", 0))
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
            "target_bytes": self.target_bytes,
            "target_rows": self.target_rows,
            "sessions": self.sessions,
        }


def format_summary(summary: dict) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items())
    fired = ", ".join(f"{k} {v}" for k, v in summary["gates_fired"].items())
    lines = [
        f"problems seen:     {summary['problems_seen']}",
        f"pairs kept:        {summary['pairs_kept']}",
        f"skipped:           {skipped}",
        f"teacher solutions: {summary['teacher_solutions']} (gates fired on them: {fired})",
        f"tokens generated:  {summary['tokens_generated']} ({summary['rollout_tokens']} rollouts, "
        f"{summary['teacher_tokens']} teacher) in {summary['generation_seconds']:.1f} s = "
        f"{summary['tokens_per_s']:.1f} tokens/s",
    ]
    if summary.get("target_rows"):
        lines.append(f"captured targets:  {summary['target_rows']} rows, {summary['target_bytes']:,} bytes = "
                     f"{summary['target_bytes'] / summary['target_rows']:,.0f} bytes per token")
    return "\n".join(lines)


def problem_seed(seed: int, tag: str, problem_id: str) -> int:
    """Sampling seed of one problem's rollouts or teacher solution: the run seed and the
    problem alone, so a restart or another pool size writes the same records."""
    digest = hashlib.sha256(f"{seed}:{tag}:{problem_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Stage1:
    """The per-problem steps of a run: the requests it sends and what it does with each output.
    run_stage1 below is the loop that drives it."""

    def __init__(self, tokenizer, files: RunFiles, opts: Stage1Options, model_name: str, stats: RunStats,
                 targets: CapturedTargets | None):
        self.tok, self.files, self.opts, self.model_name, self.stats, self.targets = tokenizer, files, opts, model_name, stats, targets

    def _request(self, prompt_ids, tag, *, samples, temperature, max_new_tokens, seed_tag, problem, capture=False):
        o = self.opts
        return Request(prompt_ids, max_new_tokens, samples, temperature, o.top_k, o.top_p, o.repetition_penalty,
                       seed=problem_seed(o.seed, seed_tag, problem.id), return_hidden=capture, tag=tag)

    def rollout_request(self, problem: Problem) -> Request:
        ids = self.tok.encode_chat(prompts.student_chat(problem.question, self.opts.system_prompt), add_generation_prompt=True)
        return self._request(ids, ("rollouts", problem), samples=self.opts.num_rollouts, temperature=self.opts.rollout_temperature,
                             max_new_tokens=self.opts.max_new_tokens, seed_tag="rollouts", problem=problem)

    def on_rollouts(self, problem: Problem, rows: list) -> Request | None:
        """Grade a problem's K rollouts: record a skip, or return the teacher's request."""
        self.stats.rollout_tokens += sum(len(c.token_ids) for c in rows)
        texts = [self.tok.decode(c.token_ids) for c in rows]
        answers, correct = grade_rollouts(texts, problem.gold, problem.dataset, self.opts.answer_rule)
        sel = select_pair(answers, correct, problem.dataset, problem_rng(self.opts.seed, problem.id),
                          [c.finish_reason == "stop" for c in rows], self.opts.answer_rule)
        info = sel.to_dict()
        info["finish_reasons"] = [c.finish_reason for c in rows]
        if self.opts.keep_rollouts:
            info["texts"] = texts
        if sel.reason:
            record = {"id": problem.id, "dataset": problem.dataset, "reason": sel.reason, "question": problem.question, "gold": problem.gold, "rollouts": info}
            append_jsonl(self.files.skipped, [record])
            self.stats.skipped[sel.reason] += 1
            return None
        correct_text, wrong_text = texts[sel.correct_index], texts[sel.wrong_index]
        chat = build_teacher_chat(problem, correct_text, wrong_text, self.opts)
        ids = self.tok.encode_chat(chat, add_generation_prompt=True)
        tag = ("teacher", problem, chat, correct_text, wrong_text, info)
        return self._request(ids, tag, samples=1, temperature=self.opts.teacher_temperature, max_new_tokens=self.opts.teacher_max_new_tokens,
                             seed_tag="teacher", problem=problem, capture=self.targets is not None)

    def on_teacher(self, tag: tuple, comp) -> None:
        """Judge a teacher solution and record the pair (its targets first) or the skip."""
        _, problem, chat, correct_text, wrong_text, info = tag
        self.stats.teacher_tokens += len(comp.token_ids)
        solution_ids = list(comp.token_ids)
        solution = self.tok.decode(solution_ids)
        reason, answer, result = judge_teacher(problem, solution, comp.finish_reason, chat, correct_text, wrong_text, self.opts)
        for g in result.fired:
            self.stats.gates_fired[g] += 1
        self.stats.teacher_solutions += 1
        record = {"id": problem.id, "dataset": problem.dataset}
        if reason is not None:
            record.update(reason=reason, question=problem.question, gold=problem.gold, teacher_answer=answer, finish_reason=comp.finish_reason,
                          gates=result.to_dict(), solution=solution, solution_ids=solution_ids, teacher_chat=chat,
                          student_chat=prompts.student_chat(problem.question, self.opts.system_prompt), rollouts=info)  # for inspection, or training on rejects
            append_jsonl(self.files.skipped, [record])
            self.stats.skipped[reason] += 1
            return
        record.update(question=problem.question, gold=problem.gold, student_chat=prompts.student_chat(problem.question, self.opts.system_prompt), teacher_chat=chat,
                      solution=solution, solution_ids=solution_ids, finish_reason=comp.finish_reason, rollouts=info,
                      model=self.model_name, teacher_answer=answer, gates=result.to_dict())
        if self.targets is not None:  # written before the pair line: a recorded pair always has its targets
            hidden = comp.hidden if self.opts.targets_dtype is None else comp.hidden.to(getattr(torch, self.opts.targets_dtype))
            self.stats.target_bytes += self.targets.write(problem.id, solution_ids, hidden)
            self.stats.target_rows += hidden.shape[0]
        append_jsonl(self.files.pairs, [record])
        self.stats.pairs += 1


def run_stage1(problems: Sequence[Problem], tokenizer, engine, files: RunFiles, opts: Stage1Options, model_name: str,
               targets: CapturedTargets | None = None, progress: bool = True) -> dict:
    """Run (or continue) stage 1 over `problems`; returns the run summary (also saved as JSON).

    engine: a minissb.engine.Engine (or anything with its run()/add()). Problems stream
    through it: a problem's rollouts are graded as soon as its K samples are done, its
    teacher request jumps the queue, and each record is written the moment it is decided.
    The caller has checked the run config (check_run_config) before anything is written.
    """
    from tqdm import tqdm

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
    stage = Stage1(tokenizer, files, opts, model_name, stats, targets)
    todo = [p for p in problems if p.id not in done]

    def feed():  # pulled lazily by the engine, whenever slots are free
        for p in todo:
            if stats.pairs >= opts.num_pairs:
                return
            yield stage.rollout_request(p)

    bar = tqdm(total=len(todo), desc="stage 1", unit="problem", disable=not progress, dynamic_ncols=True)
    bar.set_postfix(pairs=stats.pairs)
    earlier, t0 = stats.generation_seconds, time.perf_counter()

    def save_summary() -> dict:  # the time so far goes in each save: a killed session keeps its share
        stats.generation_seconds = earlier + time.perf_counter() - t0
        summary = stats.to_dict()
        write_json_atomic(files.summary, summary)
        return summary

    try:
        for out in engine.run(feed()):
            if stats.pairs >= opts.num_pairs:
                break  # enough pairs: problems still in flight stay undone
            kind, problem = out.request.tag[:2]
            if kind == "rollouts":
                teacher = stage.on_rollouts(problem, out.completions)
                if teacher is not None:
                    engine.add(teacher)
                    continue
            else:
                stage.on_teacher(out.request.tag, out.completions[0])
            bar.update(1)
            bar.set_postfix(pairs=stats.pairs)
            save_summary()
    finally:
        bar.close()
    return save_summary()


def run_config(opts: Stage1Options, model: str, dtype: str, dataset: str, split: str, data: str | None,
               data_sha256: str | None = None) -> dict:
    """What identifies a run: everything that changes its records (not how many or how fast),
    the data file's content included (edited in place, it is another run)."""
    config = {k: v for k, v in asdict(opts).items() if k not in RESTARTABLE}
    config.update(model=model, dtype=dtype, dataset=dataset, split=split, data=data)
    if data_sha256 is not None:
        config["data_sha256"] = data_sha256
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


def stage1_max_len(tokenizer, problems: Sequence[Problem], opts: Stage1Options) -> int:
    """Engine positions per slot: the longest student prompt + its cap, or the longest hinted
    prompt (two attempts of at most max_new_tokens each, re-tokenised: 64 tokens of slack
    each) + the teacher's cap, whichever is more."""
    student = max(len(tokenizer.encode_chat(prompts.student_chat(p.question, opts.system_prompt), add_generation_prompt=True)) for p in problems)
    teacher = max(len(tokenizer.encode_chat(build_teacher_chat(p, "", "", opts), add_generation_prompt=True)) for p in problems)
    return max(student + opts.max_new_tokens, teacher + 2 * (opts.max_new_tokens + 64) + opts.teacher_max_new_tokens)


def sample_main(args) -> int:
    """sample.py after argument parsing: check everything, load, then stream stage 1 through the engine."""
    from minissb.cli import check_output_dir, resolve_dtype_name, torch_device
    from minissb.data import data_file, file_sha256, load_problems
    from minissb.engine import Engine
    from minissb.model import resolve_model_dir

    files = RunFiles(Path(args.out))
    check_output_dir(files.pairs.parent)  # a file where the folder belongs, or read-only: fail before loading
    for path in (files.pairs, files.skipped, files.summary):
        if path.is_dir():
            raise SSBError(f"--out: {path} is a directory; pass the path of the pairs file (e.g. {path}/pairs.jsonl)")
    opts = Stage1Options(
        num_rollouts=args.num_rollouts, rollout_temperature=args.rollout_temperature, top_k=args.top_k or None,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, teacher_temperature=args.teacher_temperature,
        max_new_tokens=args.max_new_tokens, teacher_max_new_tokens=args.max_new_tokens if args.teacher_max_new_tokens is None else args.teacher_max_new_tokens,
        hint_order=args.hint_order, hint_gold=args.hint_gold, copy_threshold=args.copy_threshold, seed=args.seed,
        capture_targets=not args.no_targets, targets_dtype="bfloat16" if args.targets_bf16 else None,
        answer_rule=args.answer_rule, gates=not args.no_gates,
        system_prompt=prompts.read_prompt_file(args.system_prompt_file, teacher=False) if args.system_prompt_file else None,
        teacher_template=prompts.read_prompt_file(args.teacher_prompt_file, teacher=True) if args.teacher_prompt_file else None,
        num_pairs=args.num_pairs, batch_size=args.batch_size, keep_rollouts=args.keep_rollouts,
    )
    opts.validate()
    # Everything that can fail on bad input is checked before the first byte is written.
    model_dir = resolve_model_dir(args.model)
    model_name = _identity(args.model)
    device = torch_device(args.device)
    dtype_name = resolve_dtype_name(args.dtype, device)
    problems = load_problems(args.dataset, split=args.split, source=args.data, limit=args.limit)
    digest = file_sha256(data_file(args.dataset, args.split, args.data))
    config = run_config(opts, model_name, dtype_name, args.dataset, args.split, _identity(args.data), digest)
    new_run = check_run_config(files, config)
    pairs, _ = read_done(files)  # a damaged output file fails now, not after the model is loaded

    model, tokenizer = load_model_and_tokenizer(model_dir, args.tokenizer, dtype_name, str(device))
    engine = Engine(model, opts.batch_size, stage1_max_len(tokenizer, problems, opts), stop_ids=tokenizer.stop_ids,
                    cuda_graphs=args.cuda_graphs)  # a KV cache that cannot fit fails here, before any write
    if new_run:
        write_json_atomic(files.run_config, config)
    targets = None
    if opts.capture_targets:
        targets = CapturedTargets(files.targets)
        stored = getattr(torch, opts.targets_dtype) if opts.targets_dtype else model.dtype
        targets.open_for_writing(model_name, model.dtype, stored, model.config.hidden_size, [r["id"] for r in pairs])
    print(f"stage 1: {len(problems)} problems from {args.dataset}/{args.split}, model {args.model} ({dtype_name} on {model.device}), "
          f"{opts.batch_size} engine slots of {engine.max_len} positions", file=sys.stderr)
    summary = run_stage1(problems, tokenizer, engine, files, opts, model_name, targets, progress=not args.no_progress)
    print(format_summary(summary))
    print(f"wrote {files.pairs}, {files.skipped.name}, {files.summary.name}" + (f", {files.targets.name}/" if targets else ""))
    return 0


__all__ = [
    "SSBError",
    "Stage1Options",
    "Selection",
    "RunFiles",
    "grade_rollouts",
    "select_pair",
    "judge_teacher",
    "build_teacher_chat",
    "check_run_config",
    "run_stage1",
    "run_config",
    "problem_seed",
    "format_summary",
    "sample_main",
]
