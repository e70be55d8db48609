"""SSB stage 1 logic with a scripted generator: pair selection, teacher checks, records, resume."""

import json
import random

import pytest
import torch

from minissb import prompts
from minissb.data import Problem
from minissb.runs import check_run_config
from sample import stage1
from minissb.runs import read_jsonl
from minissb.engine import Completion
from minissb.ssb import (
    RunFiles,
    Stage1Options,
    judge_teacher,
    run_config,
    select_pair,
)
from minissb.tokenizer import Tokenizer


def boxed(answer, steps="We work it out step by step."):
    return f"{steps}\nSo the result is \\boxed{{{answer}}}."


# ----------------------------------------------------------------------------- pair selection


def select(answers, gold="18", seed=0, finished=None):
    correct = [a is not None and a == gold for a in answers]
    return select_pair(answers, correct, "gsm8k", random.Random(seed), finished)


def test_most_common_wrong_answer_is_chosen():
    for seed in range(20):
        sel = select(["18", "5", "7", "7"], seed=seed)
        assert sel.reason is None
        assert sel.correct_index == 0
        assert sel.wrong_index in (2, 3) and sel.wrong_answer == "7"
        assert (sel.n_correct, sel.n_wrong, sel.n_no_answer) == (1, 3, 0)


def test_equivalent_wrong_answers_count_as_one():
    # As strings these are four different one-vote answers; as numbers 26 has three votes.
    for seed in range(20):
        sel = select(["18", "5", "26", "26.00", "$26"], seed=seed)
        assert sel.wrong_index in (2, 3, 4), seed


def test_ties_are_broken_by_the_seed():
    picks = {seed: select(["18", "5", "7", None], seed=seed).wrong_answer for seed in range(40)}
    assert set(picks.values()) == {"5", "7"}  # both tied answers get drawn
    assert all(select(["18", "5", "7", None], seed=s).wrong_answer == a for s, a in picks.items())  # reproducible


def test_finished_rollouts_are_preferred():
    for seed in range(10):
        sel = select(["18", "18", "7", "7"], seed=seed, finished=[False, True, True, False])
        assert (sel.correct_index, sel.wrong_index) == (1, 2)


@pytest.mark.parametrize(
    "answers, reason",
    [
        (["18", "18", "18", "18"], "all_correct"),
        (["18", None, "18", None], "all_correct"),  # no-answer rollouts are not wrong answers
        (["5", "7", "5", "9"], "all_wrong"),
        (["5", None, None, None], "all_wrong"),
        ([None, None, None, None], "no_answer"),
    ],
)
def test_unmixed_problems_are_skipped_with_their_reason(answers, reason):
    sel = select(answers)
    assert sel.reason == reason
    assert sel.correct_index is None and sel.wrong_index is None
    assert sel.n_no_answer == answers.count(None)


# ----------------------------------------------------------------------------- teacher verification

PROBLEM = Problem(id="p/0", question="Tom has 10 apples and buys 8 more. How many apples does he have?", gold="18", dataset="gsm8k")
CORRECT = boxed(18, "He has 10 + 8 = 18 apples.")
WRONG = boxed(2, "He has 10 - 8 = 2 apples.")
CHAT = prompts.teacher_chat(PROBLEM.question, CORRECT, WRONG)
TEACHER_GOOD = boxed(18, "Buying adds apples, so add rather than subtract: 10 + 8 gives eighteen in total.")


@pytest.mark.parametrize(
    "solution, finish, reason",
    [
        (TEACHER_GOOD, "stop", None),
        (boxed(2, "Buying means 10 - 8, which leaves two."), "stop", "teacher_wrong"),
        ("Buying adds apples: 10 + 8 = 18 and so", "length", "teacher_wrong"),  # no answer at all
        (TEACHER_GOOD, "length", "truncated"),
        ("The second response subtracts. " + TEACHER_GOOD, "stop", "leak"),
        ("Here it is again. " + CORRECT, "stop", "copy"),
    ],
)
def test_teacher_verification(solution, finish, reason):
    got, answer, result = judge_teacher(PROBLEM, solution, finish, CHAT, CORRECT, WRONG, Stage1Options())
    assert got == reason, result.to_dict()


# ----------------------------------------------------------------------------- the run with a scripted generator


class ScriptedEngine:
    """Stand-in for minissb.engine.Engine: chosen texts for each problem's rollouts and teacher.

    script: question -> {"rollouts": [text | (text, finish)], "teacher": text | (text, finish)}.
    It finds the problem by decoding the prompt, and the teacher's requests by their tag. Like the
    engine it pulls the feed lazily, serves add()ed requests first, and yields each request's
    completions at once; fail_on_call raises in the middle of the run, as a crash would.
    """

    def __init__(self, tokenizer, script, fail_on_call=None):
        self.tok, self.script, self.calls, self.fail_on_call = tokenizer, script, [], fail_on_call
        self.queue = []

    def add(self, request):
        self.queue.append(request)

    def run(self, feed):
        feed = iter(feed)
        while True:
            req = self.queue.pop(0) if self.queue else next(feed, None)
            if req is None:
                return
            yield self._answer(req)

    def _answer(self, req):
        from minissb.engine import RequestOutput

        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt("killed")  # a crash in the middle of the run
        text = self.tok.decode(req.prompt)
        teacher = req.tag[0] == "teacher"
        self.calls.append({"text": text, "teacher": teacher, "num_samples": req.num_samples, "temperature": req.temperature,
                           "top_k": req.top_k, "seed": req.seed, "return_hidden": req.return_hidden})
        entry = next(v for q, v in self.script.items() if q in text)
        outputs = [entry["teacher"]] if teacher else entry["rollouts"]
        assert len(outputs) == req.num_samples
        comps = []
        for j, o in enumerate(outputs):
            o, finish = (o, "stop") if isinstance(o, str) else o
            ids = self.tok.encode(o)
            hidden = torch.randn(len(ids) + (finish == "stop"), 8) if req.return_hidden else None
            comps.append(Completion(prompt_index=0, sample_index=j, token_ids=ids, text=o, finish_reason=finish, hidden=hidden))
        return RequestOutput(req, comps)


def problems_and_script():
    """Seven problems, one for every outcome."""
    p = [Problem(id=f"t/{i}", question=f"Question number {i}: what is {i} plus {i}?", gold=str(2 * i), dataset="gsm8k") for i in range(1, 8)]
    good = lambda i: boxed(2 * i, f"Add the two numbers, taking care to add and not multiply: {i} + {i} is twice {i}.")  # noqa: E731
    right = lambda i: boxed(2 * i, f"{i} + {i} = {2 * i}.")  # noqa: E731
    script = {
        p[0].question: {"rollouts": [right(1), boxed(1), boxed(1, "1 times 1 is 1."), "no answer here"], "teacher": good(1)},  # pair
        p[1].question: {"rollouts": [right(2)] * 4, "teacher": None},  # all_correct
        p[2].question: {"rollouts": [boxed(7), boxed(8), "no idea", "nothing"], "teacher": None},  # all_wrong
        p[3].question: {"rollouts": ["I do not know."] * 4, "teacher": None},  # no_answer
        p[4].question: {"rollouts": [right(5), boxed(25), boxed(25), right(5)], "teacher": boxed(25, "Five times five.")},  # teacher_wrong
        p[5].question: {"rollouts": [boxed(36), right(6), boxed(36), boxed(1)], "teacher": "The student in response 1 is right. " + good(6)},  # leak
        p[6].question: {"rollouts": [right(7), boxed(49), right(7), boxed(0)], "teacher": good(7)},  # pair
    }
    return p, script


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return Tokenizer.from_dir(tiny_tokenizer_dir)


def run(tok, tmp_path, opts=None, gen=None, problems=None, targets=None):
    probs, script = problems_and_script()
    gen = gen or ScriptedEngine(tok, script)
    files = RunFiles(tmp_path / "pairs.jsonl")
    summary = stage1(problems or probs, tok, gen, files, opts or Stage1Options(), "tiny", targets, progress=False)
    return files, summary, gen


def test_full_flow_records_and_summary(tok, tmp_path):
    files, summary, gen = run(tok, tmp_path)
    pairs, skipped = read_jsonl(files.pairs), read_jsonl(files.skipped)
    assert [p["id"] for p in pairs] == ["t/1", "t/7"]
    reasons = {r["id"]: r["reason"] for r in skipped}
    assert reasons == {"t/2": "all_correct", "t/3": "all_wrong", "t/4": "no_answer", "t/5": "teacher_wrong", "t/6": "leak"}

    pair = pairs[0]
    assert pair["student_chat"] == prompts.student_chat("Question number 1: what is 1 plus 1?")
    assert pair["solution_ids"] == tok.encode(pair["solution"])
    assert pair["finish_reason"] == "stop" and pair["model"] == "tiny" and pair["gold"] == "2"
    r = pair["rollouts"]
    assert (r["k"], r["n_correct"], r["n_wrong"], r["n_no_answer"]) == (4, 1, 2, 1)
    assert r["answers"] == ["2", "1", "1", None]
    assert r["correct_index"] == 0 and r["wrong_index"] in (1, 2) and r["wrong_answer"] == "1"
    user = pair["teacher_chat"][-1]["content"]
    assert user.index(prompts.LABEL_CORRECT) < user.index(prompts.LABEL_WRONG)  # the paper's order
    assert "1 + 1 = 2." in user and prompts.LABEL_GOLD not in user

    # rejected teacher solutions are kept for inspection
    leak = next(r for r in skipped if r["reason"] == "leak")
    assert leak["solution"].startswith("The student in response 1") and "leak" in leak["gates"]["fired"]

    # generation settings: rollouts K=4 at T=0.8 top-k 50, teacher one sample at T=0.4
    rollout_calls = [c for c in gen.calls if not c["teacher"]]
    teacher_calls = [c for c in gen.calls if c["teacher"]]
    assert len(rollout_calls) == 7 and len(teacher_calls) == 4  # one request per problem, one per mixed problem
    assert len({c["seed"] for c in gen.calls}) == 11  # each problem's rollouts and teacher have their own seed
    assert not any(c["return_hidden"] for c in gen.calls)  # no targets folder given: nothing captured
    assert all((c["num_samples"], c["temperature"], c["top_k"]) == (4, 0.8, 50) for c in rollout_calls)
    assert all((c["num_samples"], c["temperature"], c["top_k"]) == (1, 0.4, 50) for c in teacher_calls)

    assert summary["problems_seen"] == 7 and summary["pairs_kept"] == 2
    assert summary["skipped"] == {"all_correct": 1, "all_wrong": 1, "no_answer": 1, "teacher_wrong": 1, "truncated": 0, "leak": 1, "copy": 0}
    assert summary["teacher_solutions"] == 4 and summary["gates_fired"]["leak"] == 1
    assert summary["rollout_tokens"] > 0 and summary["teacher_tokens"] > 0
    assert json.loads(files.summary.read_text()) == summary


def test_hint_options_change_the_teacher_prompt_only(tok, tmp_path):
    _, _, base = run(tok, tmp_path / "a")
    files, _, gen = run(tok, tmp_path / "b", Stage1Options(hint_order="wrong-first", hint_gold=True))
    user = read_jsonl(files.pairs)[0]["teacher_chat"][-1]["content"]
    assert user.index(prompts.LABEL_WRONG) < user.index(prompts.LABEL_CORRECT)
    assert f"{prompts.LABEL_GOLD} 2" in user
    rollouts = lambda g: [c for c in g.calls if not c["teacher"]]  # noqa: E731
    assert rollouts(gen) == rollouts(base)  # same rollout prompts, same seeds


def test_stops_after_num_pairs_and_extends_on_restart(tok, tmp_path):
    files, summary, _ = run(tok, tmp_path, Stage1Options(num_pairs=1))
    assert summary["pairs_kept"] == 1
    assert "t/7" not in {r["id"] for r in read_jsonl(files.skipped)}  # the unused mixed problem stays undone
    files, summary, gen = run(tok, tmp_path, Stage1Options(num_pairs=5))
    assert [p["id"] for p in read_jsonl(files.pairs)] == ["t/1", "t/7"]
    assert summary["problems_seen"] == 7 and summary["sessions"] == 2
    assert [t for c in gen.calls if "Question number 1:" in c["text"]] == []  # nothing redone


def test_crash_mid_batch_then_resume_loses_and_duplicates_nothing(tok, tmp_path):
    probs, script = problems_and_script()
    reference, _, _ = run(tok, tmp_path / "ref")
    # crash at the rollouts of the fifth problem: the four before it are already on disk
    crashing = ScriptedEngine(tok, script, fail_on_call=5)
    with pytest.raises(KeyboardInterrupt):
        run(tok, tmp_path / "run", gen=crashing)
    files = RunFiles(tmp_path / "run" / "pairs.jsonl")
    before = {r["id"] for r in read_jsonl(files.skipped)} | {r["id"] for r in read_jsonl(files.pairs)}
    assert before == {"t/1", "t/2", "t/3", "t/4"}
    # plus a half-written last line, as a SIGKILL during a write leaves it
    with open(files.skipped, "a") as f:
        f.write('{"id": "t/5", "reason": "teac')
    with pytest.warns(UserWarning, match="partial"):
        files, summary, gen = run(tok, tmp_path / "run")
    ids = [r["id"] for r in read_jsonl(files.pairs) + read_jsonl(files.skipped)]
    assert sorted(ids) == [f"t/{i}" for i in range(1, 8)]  # each problem exactly once
    strip = lambda recs: sorted((r["id"], r.get("reason"), r.get("solution")) for r in recs)  # noqa: E731
    assert strip(read_jsonl(files.pairs)) == strip(read_jsonl(reference.pairs))
    assert strip(read_jsonl(files.skipped)) == strip(read_jsonl(reference.skipped))
    assert summary["problems_seen"] == 7 and summary["pairs_kept"] == 2


def test_answers_come_only_from_boxed(tok, tmp_path):
    # "the answer is ..." phrases are not answers in stage 1: a cut-off rollout ending on one
    # would count as a wrong answer and make an all-correct problem look mixed.
    p = [Problem(id="q/1", question="Question number 1: what is 1 plus 1?", gold="2", dataset="gsm8k"),
         Problem(id="q/2", question="Question number 2: what is 2 plus 2?", gold="4", dataset="gsm8k")]
    script = {
        p[0].question: {"rollouts": [boxed(2), boxed(2), ("So the answer depends on the number of", "length"), "The answer is 3."], "teacher": None},
        p[1].question: {"rollouts": ["The answer is 4.", "The answer is 5.", "the answer is 4", "Final answer: 4"], "teacher": None},
    }
    files, summary, _ = run(tok, tmp_path, gen=ScriptedEngine(tok, script), problems=p)
    assert {r["id"]: r["reason"] for r in read_jsonl(files.skipped)} == {"q/1": "all_correct", "q/2": "no_answer"}
    assert read_jsonl(files.skipped)[0]["rollouts"]["answers"] == ["2", "2", None, None]


def test_captured_targets_for_kept_pairs_only(tok, tmp_path):
    from minissb.targets import CapturedTargets

    targets = CapturedTargets(tmp_path / "pairs.targets")
    targets.open_for_writing("tiny", torch.float32, torch.float32, 8, [])
    files, summary, gen = run(tok, tmp_path, targets=targets)
    assert [c["return_hidden"] for c in gen.calls if c["teacher"]] == [True] * 4 and not any(c["return_hidden"] for c in gen.calls if not c["teacher"])
    pairs = read_jsonl(files.pairs)
    assert sorted(f.name.split("-")[0] for f in (tmp_path / "pairs.targets").glob("*.safetensors")) == ["t_1", "t_7"]
    for pair in pairs:
        assert targets.read(pair["id"], pair["solution_ids"]).shape == (len(pair["solution_ids"]) + 1, 8)
    assert summary["target_rows"] == sum(len(p["solution_ids"]) + 1 for p in pairs) and summary["target_bytes"] > 0
    # An orphan (targets written, pair line never appended: a kill between the two) is removed on restart.
    targets.write("t/9", [1, 2], torch.zeros(3, 8))
    targets.open_for_writing("tiny", torch.float32, torch.float32, 8, [p["id"] for p in pairs])
    assert not targets.has("t/9") and all(targets.has(p["id"]) for p in pairs)

    with pytest.raises(ValueError, match="other settings"):
        targets.open_for_writing("tiny", torch.bfloat16, torch.float32, 8, [])


def test_run_config_mismatch_is_refused(tmp_path):
    files = RunFiles(tmp_path / "pairs.jsonl")
    config = run_config(Stage1Options(), "m", "bf16", "gsm8k", "train", None)
    assert check_run_config(files.run_config, config, [files.pairs, files.skipped]) is True
    files.run_config.write_text(json.dumps(config))
    files.pairs.write_text('{"id": "a"}\n')
    assert check_run_config(files.run_config, run_config(Stage1Options(num_pairs=9, batch_size=2), "m", "bf16", "gsm8k", "train", None), [files.pairs]) is False
    with pytest.raises(ValueError, match="num_rollouts: 4 there, 8 now"):
        check_run_config(files.run_config, run_config(Stage1Options(num_rollouts=8), "m", "bf16", "gsm8k", "train", None), [files.pairs])
    files.run_config.unlink()
    with pytest.raises(ValueError, match="arguments are unknown"):
        check_run_config(files.run_config, config, [files.pairs, files.skipped])


def test_bad_options_are_refused():
    for bad in (dict(num_rollouts=1), dict(hint_order="random"), dict(copy_threshold=0), dict(batch_size=0)):
        with pytest.raises(AssertionError):
            Stage1Options(**bad)


# ----------------------------------------------------------------------------- recipes and prompt files


def test_exact_answer_rule_and_gates_off_as_in_the_original(tok, tmp_path):
    # "$4.00" is 4 by meaning but not the gold string "4": under the exact rule it is a wrong
    # answer, so the problem is mixed; under ours it is all correct.
    p = [Problem(id="e/1", question="Question number 1: what is 2 plus 2?", gold="4", dataset="gsm8k")]
    leak = "The student in response 1 is right. " + boxed(4, "Two and two make four, as two plus two is four.")
    script = {p[0].question: {"rollouts": [boxed(4), boxed("4.00"), boxed(4), boxed(4)], "teacher": leak}}
    files, _, _ = run(tok, tmp_path / "ours", gen=ScriptedEngine(tok, script), problems=p)
    assert read_jsonl(files.skipped)[0]["reason"] == "all_correct"
    opts = Stage1Options(answer_rule="exact", gates=False)
    files, _, _ = run(tok, tmp_path / "exact", opts, gen=ScriptedEngine(tok, script), problems=p)
    pair = read_jsonl(files.pairs)[0]  # kept although the leak gate fired: the gates do not decide
    assert pair["rollouts"]["wrong_answer"] == "4.00" and "leak" in pair["gates"]["fired"]


def test_prompt_files_render_as_given(tok, tmp_path):
    template = "SOLVE {question}\nGOOD: {correct}\nBAD: {wrong}\nKeep \\boxed{} as written."
    (tmp_path / "t.txt").write_text(template)
    (tmp_path / "s.txt").write_text("You are a tester.")
    opts = Stage1Options(system_prompt=prompts.read_prompt_file(tmp_path / "s.txt", teacher=False),
                         teacher_template=prompts.read_prompt_file(tmp_path / "t.txt", teacher=True))
    files, _, gen = run(tok, tmp_path / "run", opts)
    pair = read_jsonl(files.pairs)[0]
    assert pair["student_chat"][0]["content"] == "You are a tester." and pair["teacher_chat"][0]["content"] == "You are a tester."
    user = pair["teacher_chat"][1]["content"]
    assert user.startswith("SOLVE Question number 1: what is 1 plus 1?\nGOOD: ") and user.endswith("Keep \\boxed{} as written.")
    assert "\nBAD: " in user and prompts.LABEL_CORRECT not in user
    assert all("You are a tester." in c["text"] for c in gen.calls)  # rollouts saw the file's system prompt too
    (tmp_path / "bad.txt").write_text("SOLVE {question} with {correct}")
    with pytest.raises(ValueError, match=r"no \{wrong\} placeholder"):
        prompts.read_prompt_file(tmp_path / "bad.txt", teacher=True)


def test_recipe_original_sets_the_settings_and_needs_the_prompt_files(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from minissb.recipes import ORIGINAL, parse_with_recipe

    spec = importlib.util.spec_from_file_location("sample_cli", Path(__file__).resolve().parents[1] / "sample.py")
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    files = ["--system-prompt-file", "s.txt", "--teacher-prompt-file", "t.txt"]
    args = parse_with_recipe(sample.build_parser(), ["--recipe", "original", *files], "sample")
    for key, value in ORIGINAL["sample"].items():
        assert getattr(args, key) == value, key
    assert (args.top_p, args.repetition_penalty, args.answer_rule, args.max_new_tokens) == (0.8, 1.05, "exact", 8192)
    mine = parse_with_recipe(sample.build_parser(), [], "sample")
    assert (mine.top_p, mine.repetition_penalty, mine.answer_rule, mine.gates) == (None, 1.0, "meaning", True)
    override = parse_with_recipe(sample.build_parser(), ["--recipe", "original", *files, "--max-new-tokens", "1024"], "sample")
    assert override.max_new_tokens == 1024 and override.top_p == 0.8  # an explicit option wins
    with pytest.raises(SystemExit):
        parse_with_recipe(sample.build_parser(), ["--recipe", "original"], "sample")
    assert "needs --system-prompt-file" in capsys.readouterr().err
