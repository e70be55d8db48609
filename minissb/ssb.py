"""SSB stage 1: rollouts -> a correct and a wrong attempt -> hinted teacher solution -> checked pair.

For each training problem, in data order, many problems in flight at once:

1. sample K rollouts of the student chat (system prompt + bare question);
2. grade them; a problem needs at least one correct and one wrong answer, otherwise it is
   skipped as all_correct, all_wrong or no_answer (a rollout with no extracted answer is
   neither right nor wrong);
3. pick one correct rollout and one rollout with the most common wrong answer (answers that
   are equivalent count as one, via grader.group_answers; ties are broken by a seeded draw);
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

Several ranks (torchrun, minissb.dist): every rank reads the records of the output and of
every part file before any rank writes, takes problem i of those left (i % world), and appends
to its own parts (pairs.rank1.jsonl, pairs.skipped.rank1.jsonl) and its own part summary
(pairs.summary.rank1.json: its tokens and seconds); targets go into the one shared folder, a
file per pair. At the end of a session rank 0 merges the records in problem order - one
process does the same - and writes pairs.summary.json: counts from the merged records, tokens
and seconds summed over ranks (generation_seconds are then rank-seconds). With --num-pairs, a
rank stops once the pairs of all ranks (it counts the lines of the others' parts) reach the
number; ranks finishing at the same moment can keep up to world - 1 extra pairs, and which
problems were in flight when it stopped differs from one process. A run that ends by --limit
(every problem decided) writes the same files at every world size.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from minissb import dist, gates, grader, prompts
from minissb.data import Problem
from minissb.engine import Request
from minissb.runs import append_jsonl, problem_seed, write_json_atomic
from minissb.targets import CapturedTargets, targets_dir_for


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

    def __post_init__(self):  # sample.py's options already hold these: a violation is a caller's bug
        assert self.num_rollouts >= 2, "need at least 2 rollouts to find a correct and a wrong one"
        assert self.rollout_temperature >= 0 and self.teacher_temperature >= 0, "temperatures are >= 0 (0 = greedy)"
        assert self.top_k is None or self.top_k >= 1, "top_k is None (off) or >= 1"
        assert self.top_p is None or 0 < self.top_p <= 1, "top_p is None (off) or in (0, 1]"
        assert 0 < self.repetition_penalty < float("inf"), "repetition_penalty is finite and > 0 (1 = off)"
        assert min(self.max_new_tokens, self.teacher_max_new_tokens, self.num_pairs, self.batch_size) >= 1
        assert self.answer_rule in ("meaning", "exact") and self.hint_order in ("correct-first", "wrong-first")
        assert 0 < self.copy_threshold <= 1, "copy_threshold is in (0, 1]"


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
        return {"k": len(self.answers), "n_correct": self.n_correct, "n_wrong": self.n_wrong, "n_no_answer": self.n_no_answer,
                "answers": self.answers, "correct_index": self.correct_index, "wrong_index": self.wrong_index,
                "wrong_answer": self.wrong_answer}


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


def select_pair(answers: Sequence[str | None], correct: Sequence[bool], dataset: str, rng: random.Random,
                finished: Sequence[bool] | None = None, rule: str = "meaning") -> Selection:
    """Pick one correct rollout and one carrying the most common wrong answer.

    Wrong answers are grouped by meaning (grader.group_answers: "1,000", "1000.0" and "$1000"
    are one answer); the biggest group wins, ties drawn with `rng`. Within the chosen groups a
    rollout that ended on its own (`finished`) is preferred to one cut by the token limit.
    """
    answers, correct = list(answers), list(correct)
    sel = Selection(reason=None, answers=answers, correct=correct)
    wrong = [i for i, (a, c) in enumerate(zip(answers, correct)) if a is not None and not c]
    right = [i for i, c in enumerate(correct) if c]
    if not (right and wrong):
        sel.reason = "all_correct" if right else "all_wrong" if wrong else "no_answer"
        return sel

    if rule == "exact":  # the original's rule: "18.00" is not "18"
        groups = [[i for i in wrong if answers[i] == a] for a in dict.fromkeys(answers[i] for i in wrong)]
    else:
        groups = grader.group_answers([a if i in wrong else None for i, a in enumerate(answers)], dataset)
    top = max(len(g) for g in groups)
    wrong_group = rng.choice([g for g in groups if len(g) == top])  # groups in first-index order: the draw depends on rng only

    def pick(indices: list[int]) -> int:
        done = [i for i in indices if finished is None or finished[i]]
        return rng.choice(done or indices)

    sel.correct_index = pick(right)
    sel.wrong_index = pick(wrong_group)
    sel.wrong_answer = answers[sel.wrong_index]
    return sel


def build_teacher_chat(problem: Problem, correct_text: str, wrong_text: str, opts: Stage1Options) -> list[dict]:
    return prompts.teacher_chat(problem.question, correct_text, wrong_text, wrong_first=opts.hint_order == "wrong-first",
                                gold=problem.gold if opts.hint_gold else None, system=opts.system_prompt,
                                template=opts.teacher_template)


def judge_teacher(problem: Problem, solution: str, finish_reason: str, teacher_chat: list[dict], correct_text: str,
                  wrong_text: str, opts: Stage1Options) -> tuple[str | None, str | None, gates.GateResult]:
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

    def _beside(self, suffix: str) -> Path:
        stem = self.pairs.with_suffix("") if self.pairs.suffix == ".jsonl" else self.pairs
        return stem.with_name(stem.name + suffix)

    skipped = property(lambda self: self._beside(".skipped.jsonl"))
    run_config = property(lambda self: self._beside(".run.json"))
    summary = property(lambda self: self._beside(".summary.json"))
    targets = property(lambda self: targets_dir_for(self.pairs))  # where train.py looks for them

    def outputs(self) -> list[Path]:
        """The record files of the run: pairs, skipped and the part files of either."""
        return [self.pairs, self.skipped, *dist.part_files(self.pairs), *dist.part_files(self.skipped)]

    def read_summary(self) -> dict | None:
        """The summary of the earlier sessions of this run (their token and time totals), if readable."""
        try:
            return json.loads(self.summary.read_text()) if self.summary.is_file() else None
        except json.JSONDecodeError:
            return None  # only the totals are lost; the counts come from the records


def read_done(files: RunFiles) -> tuple[list[dict], list[dict]]:
    """The records already written (pairs, skipped; the output and every rank's part), checked
    for the fields a resume needs."""

    def check(path: Path, n: int, rec: dict, skips: bool = False) -> None:
        if not isinstance(rec.get("id"), str) or (skips and "reason" not in rec):
            raise ValueError(f"{path}: record {n} has no 'id'{' or reason' if skips else ''}: not written by sample.py?")

    return dist.read_all(files.pairs, check), dist.read_all(files.skipped, lambda path, n, rec: check(path, n, rec, True))


# ----------------------------------------------------------------------------- the run


# What a summary carries from session to session and sums over ranks; the counts come from the records.
TOTALS = ("rollout_tokens", "teacher_tokens", "generation_seconds", "target_bytes", "target_rows")


class RunStats:
    """Counts for the run summary; rebuilt from the files on restart, so they cover the whole run.
    Under torchrun (part = an id of this rank's session) a save writes only this rank's TOTALS."""

    def __init__(self, pairs: list[dict], skipped: list[dict], previous: dict | None, part: str | None = None):
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
        self.part = part
        self._clock = time.perf_counter()  # save() adds the time since the last save

    def save(self, path: Path) -> dict:
        """Write the summary, this session's time so far included (a killed session keeps its share)."""
        now = time.perf_counter()
        self.generation_seconds += now - self._clock
        self._clock = now
        summary = self.to_dict() if self.part is None else {"part": self.part, **{k: getattr(self, k) for k in TOTALS}}
        write_json_atomic(path, summary)
        return summary

    def to_dict(self) -> dict:
        tokens = self.rollout_tokens + self.teacher_tokens
        return {"problems_seen": self.pairs + sum(self.skipped.values()), "pairs_kept": self.pairs,
                "skipped": {r: self.skipped[r] for r in (*ROLLOUT_SKIPS, *TEACHER_SKIPS)},
                "teacher_solutions": self.teacher_solutions, "gates_fired": {g: self.gates_fired[g] for g in gates.GATES},
                "rollout_tokens": self.rollout_tokens, "teacher_tokens": self.teacher_tokens, "tokens_generated": tokens,
                "generation_seconds": round(self.generation_seconds, 2),
                "tokens_per_s": round(tokens / self.generation_seconds, 1) if self.generation_seconds else 0.0,
                "target_bytes": self.target_bytes, "target_rows": self.target_rows, "sessions": self.sessions}


def _read_part_summary(path: Path) -> dict | None:
    try:
        part = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # only that rank's totals are lost; the counts come from the records
    return part if isinstance(part, dict) and isinstance(part.get("part"), str) else None


def merge_summaries(files: RunFiles, pairs: list[dict], skipped: list[dict]) -> dict | None:
    """Rank 0: fold the part summaries into the summary (counts from the records, the earlier
    totals plus every part's; the parts, one session's ranks, count as one more session), then
    delete them. A part whose id the summary lists was folded in already, by a merge killed
    before it deleted the parts. Returns the new summary, None when nothing was folded."""
    parts = dist.part_files(files.summary)
    previous = files.read_summary() or {}
    folded = set(previous.get("merged_parts", []))
    new = [q for q in map(_read_part_summary, parts) if q is not None and q["part"] not in folded]
    summary = None
    if new:
        stats = RunStats(pairs, skipped, previous)
        for part in new:
            for k in TOTALS:
                setattr(stats, k, getattr(stats, k) + part.get(k, 0))
        summary = {**stats.to_dict(), "merged_parts": [q["part"] for q in new]}
        write_json_atomic(files.summary, summary)
    for p in parts:
        p.unlink()
    return summary


def start_run(files: RunFiles, world: dist.World) -> tuple[RunStats, set[str], dist.PartLines]:
    """What a session starts from, the same on every rank: the records of the output and of every
    part, read by all ranks before any rank writes (so all split the same problems left), the
    stats they give, and a count of the other ranks' pairs from here on. Rank 0 first tidies
    what a killed session left: part summaries (folded in) and done notes."""
    if world.is_main:
        for path in (files.pairs, files.skipped):  # both exist from the start, empty or not, for the next stage
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    pairs, skipped = read_done(files)
    others = dist.PartLines(files.pairs, world)  # before anyone appends

    def tidy():
        merge_summaries(files, pairs, skipped)
        dist.clear_done(files.pairs)

    dist.on_main(world, tidy)  # the barrier: from here on every rank appends
    part = uuid.uuid4().hex if world.distributed else None
    stats = RunStats(pairs, skipped, None if part else files.read_summary(), part)  # the counts and totals of earlier sessions
    return stats, {r["id"] for r in (*pairs, *skipped)}, others


def finished_summary(files: RunFiles, problems: Sequence[Problem], pairs: list[dict], skipped: list[dict],
                     num_pairs: int) -> dict | None:
    """The summary of a run with nothing left to do (enough pairs, or a record for every problem,
    no part files of a killed torchrun session to merge), else None: a rerun of a finished
    sample.py reports it and writes nothing, not even a session count."""
    done = {r["id"] for r in (*pairs, *skipped)}
    finished = len(pairs) >= num_pairs or all(p.id in done for p in problems)
    if not finished or dist.part_files(files.pairs) or dist.part_files(files.skipped):
        return None
    return files.read_summary()


def merge_records(files: RunFiles, problems: Sequence[Problem]) -> tuple[list[dict], list[dict]]:
    """Rank 0: pairs and skipped files rewritten in problem order from the output and every part."""
    order = [p.id for p in problems]
    return dist.merge(files.pairs, order), dist.merge(files.skipped, order)


def finish_run(files: RunFiles, problems: Sequence[Problem], stats: RunStats, world: dist.World) -> dict:
    """End of a session: save this rank's totals and leave its done note; rank 0 waits for every
    rank, merges the records in problem order and, under torchrun, folds the part summaries in.
    Returns the run's summary on rank 0, a rank's own totals elsewhere."""
    own = stats.save(dist.write_path(files.summary, world))
    dist.wait_for_ranks(world, files.pairs)
    if not world.is_main:
        return own
    pairs, skipped = merge_records(files, problems)
    return (merge_summaries(files, pairs, skipped) or own) if world.distributed else own


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


class Stage1:
    """The per-problem steps of a run: the requests it sends and what it does with each output.
    sample.py's stage1() is the loop that drives it."""

    def __init__(self, tokenizer, files: RunFiles, opts: Stage1Options, model_name: str, stats: RunStats,
                 targets: CapturedTargets | None, world: dist.World = dist.World()):
        self.tok, self.files, self.opts, self.model_name, self.stats, self.targets = tokenizer, files, opts, model_name, stats, targets
        # The files this process appends to: the outputs in one process, this rank's parts under torchrun.
        self.pairs_out, self.skipped_out = dist.write_path(files.pairs, world), dist.write_path(files.skipped, world)

    def _request(self, prompt_ids, tag: tuple, samples: int, temperature: float, max_new_tokens: int,
                 capture: bool = False) -> Request:
        """tag = (stage, problem, ...): the seed comes from the stage and the problem alone."""
        o, (stage, problem) = self.opts, tag[:2]
        return Request(prompt_ids, max_new_tokens, samples, temperature, o.top_k, o.top_p, o.repetition_penalty,
                       seed=problem_seed(o.seed, stage, problem.id), return_hidden=capture, tag=tag)

    def rollout_request(self, problem: Problem) -> Request:
        o = self.opts
        ids = self.tok.encode_chat(prompts.student_chat(problem.question, o.system_prompt), add_generation_prompt=True)
        return self._request(ids, ("rollouts", problem), o.num_rollouts, o.rollout_temperature, o.max_new_tokens)

    def on_rollouts(self, problem: Problem, rows: list) -> Request | None:
        """Grade a problem's K rollouts: record a skip, or return the teacher's request."""
        self.stats.rollout_tokens += sum(len(c.token_ids) for c in rows)
        texts = [self.tok.decode(c.token_ids) for c in rows]
        answers, correct = grade_rollouts(texts, problem.gold, problem.dataset, self.opts.answer_rule)
        rng = random.Random(f"{self.opts.seed}:{problem.id}")  # per problem: picks do not depend on batching or restarts
        finished = [c.finish_reason == "stop" for c in rows]
        sel = select_pair(answers, correct, problem.dataset, rng, finished, self.opts.answer_rule)
        info = sel.to_dict()
        info["finish_reasons"] = [c.finish_reason for c in rows]
        if self.opts.keep_rollouts:
            info["texts"] = texts
        if sel.reason:
            record = {"id": problem.id, "dataset": problem.dataset, "reason": sel.reason, "question": problem.question,
                      "gold": problem.gold, "rollouts": info}
            append_jsonl(self.skipped_out, [record])
            self.stats.skipped[sel.reason] += 1
            return None
        correct_text, wrong_text = texts[sel.correct_index], texts[sel.wrong_index]
        chat = build_teacher_chat(problem, correct_text, wrong_text, self.opts)
        ids = self.tok.encode_chat(chat, add_generation_prompt=True)
        tag = ("teacher", problem, chat, correct_text, wrong_text, info)
        return self._request(ids, tag, 1, self.opts.teacher_temperature, self.opts.teacher_max_new_tokens,
                             capture=self.targets is not None)

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
        student_chat = prompts.student_chat(problem.question, self.opts.system_prompt)
        if reason is not None:  # the whole pair all the same: for inspection, or training on rejects
            record.update(reason=reason, question=problem.question, gold=problem.gold, teacher_answer=answer,
                          finish_reason=comp.finish_reason, gates=result.to_dict(), solution=solution, solution_ids=solution_ids,
                          teacher_chat=chat, student_chat=student_chat, rollouts=info)
            append_jsonl(self.skipped_out, [record])
            self.stats.skipped[reason] += 1
            return
        record.update(question=problem.question, gold=problem.gold, student_chat=student_chat, teacher_chat=chat,
                      solution=solution, solution_ids=solution_ids, finish_reason=comp.finish_reason, rollouts=info,
                      model=self.model_name, teacher_answer=answer, gates=result.to_dict())
        if self.targets is not None:  # written before the pair line: a recorded pair always has its targets
            hidden = comp.hidden if self.opts.targets_dtype is None else comp.hidden.to(getattr(torch, self.opts.targets_dtype))
            self.stats.target_bytes += self.targets.write(problem.id, solution_ids, hidden)
            self.stats.target_rows += hidden.shape[0]
        append_jsonl(self.pairs_out, [record])
        self.stats.pairs += 1


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


def stage1_max_len(tokenizer, problems: Sequence[Problem], opts: Stage1Options) -> int:
    """Engine positions per slot: the longest student prompt + its cap, or the longest hinted
    prompt (two attempts of at most max_new_tokens each, re-tokenised: 64 tokens of slack
    each) + the teacher's cap, whichever is more."""
    student = max(len(tokenizer.encode_chat(prompts.student_chat(p.question, opts.system_prompt), add_generation_prompt=True)) for p in problems)
    teacher = max(len(tokenizer.encode_chat(build_teacher_chat(p, "", "", opts), add_generation_prompt=True)) for p in problems)
    return max(student + opts.max_new_tokens, teacher + 2 * (opts.max_new_tokens + 64) + opts.teacher_max_new_tokens)


__all__ = ["Stage1Options", "Selection", "RunFiles", "grade_rollouts", "select_pair", "judge_teacher", "build_teacher_chat",
           "run_config", "format_summary", "Stage1", "RunStats", "read_done", "start_run", "finish_run", "finished_summary", "merge_records",
           "merge_summaries", "stage1_max_len"]
