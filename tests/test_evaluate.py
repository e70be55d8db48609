"""minissb.evaluate: metrics (pass@1, avg@k, maj@k, Wilson intervals), resumable response files,
dataset loading from the three hub layouts, and the results table."""

import json
import math
import warnings
from dataclasses import dataclass

import pytest

from minissb import prompts
from minissb.data import Problem
from minissb.runs import check_run_config
from minissb.runs import PartialLineWarning
from minissb.evaluate import (
    DEFAULT_MAX_NEW_TOKENS,
    EvalTarget,
    add_deltas,
    evaluate_dataset,
    format_table,
    load_eval_problems,
    majority_vote,
    make_targets,
    read_records,
    run_config,
    score_responses,
    summarize,
    wilson_interval,
)
from minissb.tokenizer import Tokenizer

# ----------------------------------------------------------------------------- Wilson interval

# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I,
# method 3 (the Wilson score interval without continuity correction), 95%.
NEWCOMBE_WILSON = [
    ((81, 263), (0.2553, 0.3662)),
    ((15, 148), (0.0624, 0.1605)),
    ((0, 20), (0.0000, 0.1611)),
    ((1, 29), (0.0061, 0.1718)),
    ((29, 29), (0.8830, 1.0000)),
]


@pytest.mark.parametrize("counts,expected", NEWCOMBE_WILSON)
def test_wilson_matches_published_values(counts, expected):
    lo, hi = wilson_interval(*counts)
    assert (round(lo, 4), round(hi, 4)) == expected


@pytest.mark.parametrize("x,n", [(0, 1), (1, 3), (7, 30), (15, 30), (29, 30), (412, 500), (1000, 1319)])
def test_wilson_endpoints_are_where_the_score_test_is_on_the_boundary(x, n):
    # The interval is {p : |x/n - p| <= z sqrt(p (1 - p) / n)}: interior endpoints solve it with
    # equality, points just inside satisfy it, points just outside do not.
    z = 1.959963984540054
    lo, hi = wilson_interval(x, n)
    p_hat = x / n
    score = lambda p: abs(p_hat - p) - z * math.sqrt(p * (1 - p) / n)  # noqa: E731
    assert lo <= p_hat <= hi
    for end, inward in ((lo, +1), (hi, -1)):
        if 0 < end < 1:
            assert abs(score(end)) < 1e-9
            assert score(end + inward * 1e-6) < 0 < score(end - inward * 1e-6)
        else:
            assert end == (0.0 if inward > 0 else 1.0) and p_hat == end


def test_wilson_of_no_trials_is_uninformative_and_narrows_with_n():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    widths = [hi - lo for lo, hi in (wilson_interval(n // 2, n) for n in (10, 100, 1000))]
    assert widths[0] > widths[1] > widths[2]


# ----------------------------------------------------------------------------- majority vote


@pytest.mark.parametrize(
    "keys,winner",
    [
        (["7", "5", "5"], 1),  # plain majority: first sample of the winning answer
        (["5", "7", "7", "5"], 0),  # 2-2 tie: the answer seen first wins
        (["7", "5", "5", "7"], 0),
        ([None, "5", "7", "7", "5"], 1),  # a no-answer sample does not vote, or break ties
        ([None, None, "3"], 2),  # one vote beats any number of non-answers
        ([None, None], None),  # no votes at all
        ([], None),
        (["1", "2", "3"], 0),  # all different: all tied, earliest wins
    ],
)
def test_majority_vote_and_its_tie_rule(keys, winner):
    assert majority_vote(keys, "gsm8k") == winner


def test_score_responses_groups_equivalent_answers():
    # "1,000", "1000" and "1000.0" are one answer for GSM8K: 3 votes against 2 for 7.
    texts = [r"so \boxed{7}", r"\boxed{1,000}", r"\boxed{7}", r"\boxed{1000}", "I give up", r"\boxed{1000.0}"]
    answers, correct, winner = score_responses(texts, "1000", "gsm8k")
    assert answers[4] is None
    assert correct == [False, True, False, True, False, True]
    assert winner == 1


def test_score_responses_tie_goes_to_the_answer_seen_first():
    answers, correct, winner = score_responses([r"\boxed{7}", r"\boxed{1000}"], "1000", "gsm8k")
    assert winner == 0 and correct == [False, True]  # avg@2 = 0.5 but maj@2 is wrong


# ----------------------------------------------------------------------------- summaries


def _record(verdicts, tokens=10, maj=None, answers=None):
    answers = answers or ["1" if v else "2" for v in verdicts]
    return {
        "responses": [{"correct": v, "tokens": tokens, "answer": a, "finish_reason": "stop"} for v, a in zip(verdicts, answers)],
        "maj_correct": verdicts[0] if maj is None else maj,
    }


def test_summary_pass_at_1():
    records = [_record([True], tokens=10), _record([False], tokens=30), _record([True], tokens=20), _record([False], tokens=40)]
    s = summarize(records)
    assert s["problems"] == 4 and s["samples"] == 1
    assert s["accuracy"] == 0.5 and s["maj_accuracy"] == 0.5
    assert s["ci95"] == list(wilson_interval(2, 4))
    assert s["mean_tokens"] == 25.0


def test_summary_avg_at_k_and_maj_at_k():
    records = [
        _record([True, True, False, False], maj=True),  # 2/4 right; say the vote went right
        _record([True, False, False, False], maj=False),  # 1/4 right, the vote went wrong
        _record([False, False, False, False], maj=False, answers=[None, None, "2", "2"]),
    ]
    s = summarize(records)
    assert s["samples"] == 4
    assert s["accuracy"] == pytest.approx((0.5 + 0.25 + 0.0) / 3)  # mean over problems of per-problem mean
    assert s["maj_accuracy"] == pytest.approx(1 / 3)
    assert s["ci95"] == pytest.approx(list(wilson_interval(0.75, 3)))
    assert s["no_answer_rate"] == pytest.approx(2 / 12)


def test_deltas_and_table():
    results = [
        {"dataset": "gsm8k", "model": "base", "adapter": None, "problems": 24, "samples": 1, "accuracy": 0.25, "ci95": [0.12, 0.45],
         "maj_accuracy": 0.25, "maj_ci95": [0.12, 0.45], "mean_tokens": 210.4,
         "problem_scores": [1] * 6 + [0] * 18},
        {"dataset": "gsm8k", "model": "ssb", "adapter": "runs/ssb", "problems": 24, "samples": 1, "accuracy": 0.375, "ci95": [0.21, 0.57],
         "maj_accuracy": 0.375, "maj_ci95": [0.21, 0.57], "mean_tokens": 250.0,
         "problem_scores": [1] * 9 + [0] * 15},
        {"dataset": "aime24", "model": "ssb", "adapter": "runs/ssb", "problems": 30, "samples": 1, "accuracy": 0.1, "ci95": [0.03, 0.26],
         "maj_accuracy": 0.1, "maj_ci95": [0.03, 0.26], "mean_tokens": 900.0,
         "problem_scores": [1] * 3 + [0] * 27},
    ]
    add_deltas(results)
    assert results[0]["delta_vs_base"] is None
    assert results[1]["delta_vs_base"] == pytest.approx(0.125)
    assert results[2]["delta_vs_base"] is None  # no base row for aime24
    lines = format_table(results).splitlines()
    assert "pass@1" in lines[0] and "maj@" not in lines[0]
    assert "37.5 [21.0, 57.0]" in lines[3] and "+12.5 [" in lines[3] and "250" in lines[3]
    paired = results[1]["paired_vs_base"]  # 3 problems only the adapter gets right, none the other way
    assert (paired["only_base_right"], paired["only_other_right"]) == (0, 3) and paired["mcnemar_exact_p"] == pytest.approx(0.25)
    sampled = [dict(r, samples=4) for r in results]
    assert "avg@4" in format_table(sampled).splitlines()[0] and "maj@4" in format_table(sampled).splitlines()[0]


# ----------------------------------------------------------------------------- targets and run files


def test_targets_labels(tmp_path):
    for d in ("a/adapter", "b/adapter", "ssb"):
        (tmp_path / d).mkdir(parents=True)
    targets = make_targets([str(tmp_path / "a/adapter"), str(tmp_path / "b/adapter"), f"mine={tmp_path / 'ssb'}"])
    assert [t.label for t in targets] == ["base", "a-adapter", "b-adapter", "mine"]
    assert targets[0].adapter is None and targets[3].adapter == tmp_path / "ssb"
    assert [t.label for t in make_targets([str(tmp_path / "ssb")], include_base=False)] == ["ssb"]
    with pytest.raises(ValueError, match="--no-base needs at least one --adapter"):
        make_targets([], include_base=False)


def test_run_config_mismatch_refuses(tmp_path):
    gen = {"samples": 1, "temperature": 0.0, "top_k": None, "top_p": None, "max_new_tokens": 64, "seed": 0}
    cfg = run_config("m", EvalTarget("base"), "gsm8k", None, "bf16", gen)
    responses, cfg_path = tmp_path / "base__gsm8k.jsonl", tmp_path / "base__gsm8k.run.json"
    check_run_config(cfg_path, cfg, [responses])  # new run: fine
    cfg_path.write_text(json.dumps(cfg))
    check_run_config(cfg_path, cfg, [responses])  # same arguments: fine
    other = run_config("m", EvalTarget("base"), "gsm8k", None, "bf16", dict(gen, max_new_tokens=128))
    with pytest.raises(ValueError, match="max_new_tokens: 64 there, 128 now"):
        check_run_config(cfg_path, other, [responses])
    cfg_path.unlink()
    responses.write_text('{"id": "x", "responses": []}\n')
    with pytest.raises(ValueError, match="arguments are unknown"):
        check_run_config(cfg_path, cfg, [responses])


# ----------------------------------------------------------------------------- evaluate_dataset


@dataclass
class FakeCompletion:
    token_ids: list
    finish_reason: str
    text: str | None = None


class ScriptedEngine:
    """Stand-in for minissb.engine.Engine: a scripted text per sample; records every request."""

    def __init__(self, tokenizer, script: dict[str, list[str]]):
        self.tok, self.script, self.calls = tokenizer, script, []

    def run(self, requests):
        from minissb.engine import RequestOutput

        for req in requests:
            self.calls.append({"prompt": list(req.prompt), "num_samples": req.num_samples, "seed": req.seed, "temperature": req.temperature})
            chat = self.tok.decode(req.prompt)
            question = next(q for q in self.script if q in chat)
            yield RequestOutput(req, [FakeCompletion(self.tok.encode(self.script[question][j]), "stop" if j % 2 == 0 else "length")
                                      for j in range(req.num_samples)])


@pytest.fixture()
def tok(tiny_tokenizer_dir):
    return Tokenizer.from_dir(tiny_tokenizer_dir)


def _problems():
    return [
        Problem("p0", "Tom has 12 apples and buys 8 more. How many?", "20", "gsm8k"),
        Problem("p1", "What is 3 times 7?", "21", "gsm8k"),
        Problem("p2", "What is 100 minus 1?", "99", "gsm8k"),
    ]


SCRIPT = {
    "Tom has 12": [r"12 + 8 = 20, so \boxed{20}", r"\boxed{19}", r"\boxed{19}"],
    "3 times 7": [r"\boxed{21}", r"\boxed{21}", "no idea"],
    "100 minus 1": ["no idea", "still none", "nothing"],
}
GEN3 = {"samples": 3, "temperature": 0.7, "top_k": None, "top_p": None, "max_new_tokens": 32, "seed": 5}


def test_evaluate_dataset_records_metrics_and_prompt(tmp_path, tok):
    gen = ScriptedEngine(tok, SCRIPT)
    path = tmp_path / "base__gsm8k.jsonl"
    stats = evaluate_dataset(_problems(), tok, gen, path, GEN3, progress=False)
    assert len(gen.calls) == 3 and all(c["num_samples"] == 3 for c in gen.calls)  # one request per problem
    assert stats["new_problems"] == 3 and stats["new_tokens"] == sum(len(tok.encode(t)) for v in SCRIPT.values() for t in v)
    records = read_records(path)
    assert list(records) == ["p0", "p1", "p2"]
    r0 = records["p0"]
    assert [r["answer"] for r in r0["responses"]] == ["20", "19", "19"]
    assert [r["correct"] for r in r0["responses"]] == [True, False, False]
    assert r0["maj_answer"] == "19" and r0["maj_correct"] is False
    assert [r["finish_reason"] for r in r0["responses"]] == ["stop", "length", "stop"]
    assert r0["responses"][0]["text"] == SCRIPT["Tom has 12"][0]
    assert records["p1"]["maj_correct"] is True and records["p2"]["maj_answer"] is None
    s = summarize([records[i] for i in ("p0", "p1", "p2")])
    assert s["accuracy"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert s["maj_accuracy"] == pytest.approx(1 / 3)


def test_a_cut_off_response_scores_only_through_a_box(tmp_path, tok):
    # Sample 1 of each problem is cut off by the token limit (the scripted engine's "length"):
    # its answer phrase is not a final answer; the same phrase in a finished response is.
    script = {"Tom has 12": ["The answer is 20.", "the answer to part one is 20", r"\boxed{20}"]}
    evaluate_dataset(_problems()[:1], tok, ScriptedEngine(tok, script), tmp_path / "x.jsonl", GEN3, progress=False)
    rec = read_records(tmp_path / "x.jsonl")["p0"]
    assert [r["answer"] for r in rec["responses"]] == ["20", None, "20"]
    assert [r["correct"] for r in rec["responses"]] == [True, False, True]


def test_evaluate_dataset_sends_the_student_prompt(tmp_path, tok):
    p = _problems()[1]
    gen = ScriptedEngine(tok, {"3 times 7": [r"\boxed{1}"]})
    evaluate_dataset([p], tok, gen, tmp_path / "x.jsonl", dict(GEN3, samples=1), progress=False)
    seen = [c["prompt"] for c in gen.calls]
    assert seen == [tok.encode_chat(prompts.student_chat(p.question), add_generation_prompt=True)]
    assert tok.decode(seen[0]).startswith("<|im_start|>system\n" + prompts.SYSTEM_PROMPT)


def test_evaluate_dataset_resumes_and_drops_a_partial_line(tmp_path, tok):
    path = tmp_path / "base__gsm8k.jsonl"
    problems = _problems()
    evaluate_dataset(problems[:2], tok, ScriptedEngine(tok, SCRIPT), path, GEN3, progress=False)
    first = path.read_text()
    with open(path, "a") as f:  # a run killed while writing the third record
        f.write('{"id": "p2", "responses": [{"text": "cut')
    gen = ScriptedEngine(tok, SCRIPT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PartialLineWarning)
        stats = evaluate_dataset(problems, tok, gen, path, GEN3, progress=False)
    assert stats["new_problems"] == 1 and len(gen.calls) == 1  # only p2 was generated
    text = path.read_text()
    assert text.startswith(first) and text.count("\n") == 3
    assert list(read_records(path)) == ["p0", "p1", "p2"]
    # A complete file: nothing left to do.
    gen = ScriptedEngine(tok, SCRIPT)
    assert evaluate_dataset(problems, tok, gen, path, GEN3, progress=False)["new_problems"] == 0
    assert gen.calls == []


def test_evaluate_dataset_seeds_depend_on_the_problem_alone(tmp_path, tok):
    a, b = ScriptedEngine(tok, SCRIPT), ScriptedEngine(tok, SCRIPT)
    evaluate_dataset(_problems(), tok, a, tmp_path / "a.jsonl", GEN3, progress=False)
    evaluate_dataset(_problems()[::-1], tok, b, tmp_path / "b.jsonl", GEN3, progress=False)
    seeds = [c["seed"] for c in a.calls]
    assert seeds == [c["seed"] for c in b.calls][::-1] and len(set(seeds)) == 3
    c = ScriptedEngine(tok, SCRIPT)
    evaluate_dataset(_problems(), tok, c, tmp_path / "c.jsonl", dict(GEN3, seed=6), progress=False)
    assert not set(seeds) & {x["seed"] for x in c.calls}


# ----------------------------------------------------------------------------- datasets


def test_the_three_hub_layouts_parse(data_dir):
    problems = load_eval_problems(["gsm8k", "math500", "aime24"], data_dir=data_dir)
    gsm, math, aime = problems["gsm8k"], problems["math500"], problems["aime24"]
    assert (len(gsm), len(math), len(aime)) == (1319, 500, 30)
    # gsm8k: openai/gsm8k main/test parquet, the gold is the text after ####.
    assert gsm[0].question.startswith("Janet’s ducks lay 16 eggs per day") and gsm[0].gold == "18"
    assert all("####" not in p.gold for p in gsm) and {"2,125", "-3"} <= {p.gold for p in gsm}
    # math500: HuggingFaceH4/MATH-500 test.jsonl, ids are unique_id, gold the answer column.
    assert math[0].id == "test/precalculus/807.json" and math[0].gold == r"\left( 3, \frac{\pi}{2} \right)"
    # aime24: HuggingFaceH4/aime_2024 data/train parquet; ids 60..89, answers as strings.
    assert [p.id for p in aime] == [str(i) for i in range(60, 90)] and aime[0].gold == "204"
    assert all(p.dataset == name for name, ps in problems.items() for p in ps)


def test_limit_and_a_per_dataset_file(data_dir, tmp_path):
    f = tmp_path / "mini.jsonl"
    f.write_text("\n".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) for i in range(5)) + "\n")
    problems = load_eval_problems(["gsm8k", "aime24"], data_dir=data_dir, data_files={"gsm8k": str(f)}, limit=3)
    assert [p.gold for p in problems["gsm8k"]] == ["1", "2", "3"]
    assert [p.id for p in problems["aime24"]] == ["60", "61", "62"]


def test_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'gsm9k': choose from gsm8k, math500, aime24"):
        load_eval_problems(["gsm9k"], data_dir=tmp_path)
    with pytest.raises(ValueError, match="not found"):
        load_eval_problems(["math500"], data_dir=tmp_path)  # an empty folder is no mirror
    with pytest.raises(ValueError, match="does not exist"):
        load_eval_problems(["gsm8k"], data_files={"gsm8k": str(tmp_path / "nope.jsonl")})


def test_default_token_caps_cover_every_dataset():
    from minissb.data import DATASETS

    assert set(DEFAULT_MAX_NEW_TOKENS) == set(DATASETS)


def test_paired_difference_mcnemar_and_bootstrap():
    from minissb.evaluate import paired_difference

    # 7 discordant problems, 6 of them won by the other model: exact two-sided McNemar
    # p = 2 * P(X <= 1), X ~ Binomial(7, 1/2) = 2 * 8 / 128.
    base = [1] * 20 + [1] + [0] * 6 + [0] * 13
    other = [1] * 20 + [0] + [1] * 6 + [0] * 13
    r = paired_difference(base, other)
    assert (r["only_base_right"], r["only_other_right"]) == (1, 6)
    assert r["mcnemar_exact_p"] == pytest.approx(0.125)
    assert r["delta"] == pytest.approx(5 / 40)
    lo, hi = r["ci95"]
    assert lo < 5 / 40 < hi and hi - lo < 0.3  # narrower than either 95% Wilson interval (0.30 and 0.28 wide)
    # Identical answers: no difference and a zero-width interval, whatever the accuracy.
    same = paired_difference([1, 0, 1, 1], [1, 0, 1, 1])
    assert same["delta"] == 0 and same["ci95"] == [0.0, 0.0] and same["mcnemar_exact_p"] == 1.0
    # Shares (avg@k) get the bootstrap only.
    assert "mcnemar_exact_p" not in paired_difference([0.5, 1.0], [0.25, 1.0])
