"""Answer checkers side by side on labelled (response, gold, label) cases.

Checkers:
  minissb      minissb.grader.grade
  exact match  the original SSB rule: the last \\boxed{} content == the gold string
  Math-Verify  math_verify.verify(parse(gold), parse(response)) (dev-only reference)

Cases (labels are by construction, or by hand for bench/grader_cases.jsonl):
  hand     bench/grader_cases.jsonl: units, separators, answer forms, traps, cut-off outputs
  gsm8k    test problems: the worked solution ending in the gold in several written forms
           (right), in a phrase without a box (right), with a wrong value, with a later
           "correction" to a wrong value, and cut off before or inside the box (wrong)
  math500  every problem: the reference solution, the gold boxed in cosmetic variants
           (right); a bumped digit, a flipped sign, a changed bracket, a dropped list item
           (wrong); another problem's integer gold (right only if the integers are equal)
  aime24   every problem: the gold with and without leading zeros, in a phrase (right);
           other values and a cut-off box (wrong)

usage: python bench/bench_grader.py [--data ../shared/data] [--gsm8k 300] [--seed 0]
                                    [--no-math-verify] [--show 20]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path

from tqdm import tqdm

from minissb import grader, mathgrade

REPO = Path(__file__).resolve().parents[1]
HAND_CASES = REPO / "bench" / "grader_cases.jsonl"


def case(dataset, response, gold, label, why, source=None):
    return {"dataset": dataset, "response": response, "gold": gold, "label": label,
            "why": why, "source": source or dataset}


def boxed(answer: str) -> str:
    return f"Putting it together, the answer is $\\boxed{{{answer}}}$."


# ----------------------------------------------------------------------------- case builders


def gsm8k_cases(rows, rng, n):
    out = []
    for row in rng.sample(rows, min(n, len(rows))):
        gold = row["answer"].split("####")[-1].strip()
        value = int(gold.replace(",", ""))
        work = re.sub(r"<<[^>]*>>", "", row["answer"].split("####")[0]).strip()
        forms = [gold, str(value), f"{value:,}", f"\\${value:,}", f"{value}.00",
                 f"{value} \\text{{ dollars}}", f"\\text{{{value}}}", f"x = {value}"]
        for form in rng.sample(forms, 3):
            out.append(case("gsm8k", f"{work}\n{boxed(form)}", gold, True, f"right: {form}"))
        out.append(case("gsm8k", f"{work}\nThe answer is {value}.", gold, True, "right: phrase"))
        wrong = sorted({value + 1, value - 1, value * 10 if value else 3, -value if value else 7})
        for w in rng.sample(wrong, 2):
            out.append(case("gsm8k", f"{work}\n{boxed(w)}", gold, False, f"wrong: {w}"))
        w = value + rng.randint(2, 9)
        out.append(case("gsm8k", f"{work}\nWait, I made an error; recomputing gives "
                        f"$\\boxed{{{w}}}$.", gold, False, "wrong: later correction"))
        out.append(case("gsm8k", work[: len(work) // 2], gold, False, "cut off: no answer"))
        out.append(case("gsm8k", f"{work}\nSo the answer is $\\boxed{{{value}", gold, False,
                        "cut off inside the box"))
    return out


def cosmetic_variants(gold: str) -> list[str]:
    """Rewrites of a MATH500 gold that keep its meaning and change its string."""
    out = [
        gold.replace("\\frac", "\\dfrac"),
        gold.replace("^\\circ", ""),
        re.sub(r"\\text\{\s*([^{}]*?)\s*\}", r" \1", gold),
        re.sub(r"(?<![\d\s])\\frac\{(\d+)\}\{(\d+)\}", r"\1/\2", gold),
        gold.replace("\\sqrt{", "\\sqrt {").replace("+", " + "),
    ]
    if gold[:1] in "([" and gold[-1:] in ")]":
        out.append(f"\\left{gold[0]} {gold[1:-1]} \\right{gold[-1]}")
    if not re.search(r"\d,(\\!)?\s*\d{3}", gold):
        out.append(gold.replace(",", ", "))
    if re.fullmatch(r"-?\d+", gold):
        out.append(f"{gold}.0")
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", gold)
    if m:
        q = Fraction(int(m.group(2)), int(m.group(3)))
        if all(p in (2, 5) for p in _prime_factors(q.denominator)):
            out.append(m.group(1) + str(float(q)))
    return sorted({v for v in out if v.strip() != gold.strip()})


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out + ([n] if n > 1 else [])


def math500_cases(rows, rng):
    out = []
    integer_golds = [r["answer"] for r in rows if re.fullmatch(r"-?\d+", r["answer"])]
    for r in rows:
        gold = r["answer"]
        out.append(case("math500", r["solution"], gold, True, "right: reference solution"))
        variants = cosmetic_variants(gold)
        for v in rng.sample(variants, min(2, len(variants))):
            out.append(case("math500", boxed(v), gold, True, f"right: {v}"))
        # wrong by construction
        value_part = re.split(r"\\(?:mbox|text)\{", gold)[0]
        digits = [m.start() for m in re.finditer(r"\d", value_part)]
        if digits:
            i = digits[-1]
            bumped = gold[:i] + str((int(gold[i]) + 1) % 10) + gold[i + 1:]
            out.append(case("math500", boxed(bumped), gold, False, f"wrong: {bumped}"))
        if not re.search(r"=|,|\\text|\\begin|\\in\b", gold) and gold not in ("0",):
            flipped = gold[1:] if gold.startswith("-") else f"-{gold}"
            out.append(case("math500", boxed(flipped), gold, False, f"wrong: {flipped}"))
        if gold[:1] in "([" and gold[-1:] in ")]" and "," in gold:
            other = {")": "]", "]": ")"}[gold[-1]]
            out.append(case("math500", boxed(gold[:-1] + other), gold, False, "wrong: bracket"))
        parts = gold.split(",")
        if len(parts) > 1 and gold[:1] not in "([\\" and not re.search(r"\d,\\!", gold):
            dropped = ",".join(parts[:-1])
            out.append(case("math500", boxed(dropped), gold, False, f"wrong: {dropped}"))
        if gold in integer_golds:
            other = rng.choice(integer_golds)
            out.append(case("math500", boxed(other), gold, int(other) == int(gold),
                            f"other problem's gold {other}"))
    return out


def aime_cases(rows, rng):
    out = []
    golds = [r["answer"] for r in rows]
    for r in rows:
        gold, n = r["answer"], int(r["answer"])
        for form in (gold, str(n)):
            out.append(case("aime24", boxed(form), gold, True, f"right: {form}"))
        out.append(case("aime24", f"Final Answer: The final answer is {n}. I hope it is correct.",
                        gold, True, "right: phrase"))
        for w in (n + 1, n * 10 if n else 5, 999 - n):
            out.append(case("aime24", boxed(w), gold, False, f"wrong: {w}"))
        other = rng.choice(golds)
        out.append(case("aime24", boxed(other), gold, int(other) == n, f"other gold {other}"))
        out.append(case("aime24", f"so $m+n = \\boxed{{{gold[:2]}", gold, False, "cut off"))
    return out


def load_cases(data: Path, n_gsm8k: int, seed: int) -> list[dict]:
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    cases = [dict(c, source="hand") for c in map(json.loads, HAND_CASES.open())]
    gsm = pq.read_table(data / "openai__gsm8k/main/test-00000-of-00001.parquet").to_pylist()
    cases += gsm8k_cases(gsm, rng, n_gsm8k)
    math = [json.loads(line) for line in (data / "HuggingFaceH4__MATH-500/test.jsonl").open()]
    cases += math500_cases(math, rng)
    aime = pq.read_table(data / "HuggingFaceH4__aime_2024/data/train-00000-of-00001.parquet")
    cases += aime_cases(aime.to_pylist(), rng)
    return cases


# ----------------------------------------------------------------------------- checkers


def exact_match(response: str, gold: str, dataset: str) -> bool:
    boxed_content = grader.extract_answer(response, dataset, fallback=False)
    return boxed_content is not None and boxed_content.strip() == gold.strip()


def make_math_verify():
    from math_verify import parse, verify

    gold_cache = {}

    def check(response: str, gold: str, dataset: str) -> bool:
        if gold not in gold_cache:
            gold_cache[gold] = parse(f"${gold}$")
        return bool(verify(gold_cache[gold], parse(response)))

    return check


def run(check, cases, name):
    verdicts, seconds = [], []
    for c in tqdm(cases, desc=name, leave=False, file=sys.stderr):
        t0 = time.perf_counter()
        verdicts.append(bool(check(c["response"], c["gold"], c["dataset"])))
        seconds.append(time.perf_counter() - t0)
    return verdicts, seconds


_CACHES = ((grader, ("_parse_answer_cached", "_number_cached")),
           (mathgrade, ("_exact", "_values", "_symbols", "_has_inf")))


def clear_grader_caches():
    for module, names in _CACHES:
        for name in names:
            getattr(module, name).cache_clear()


def run_cold(cases):
    """minissb.grade timed with every grader cache emptied before each call."""
    seconds = []
    for c in tqdm(cases, desc="minissb, cold", leave=False, file=sys.stderr):
        clear_grader_caches()
        t0 = time.perf_counter()
        grader.grade(c["response"], c["gold"], c["dataset"])
        seconds.append(time.perf_counter() - t0)
    return seconds


def summary(cases, verdicts, source=None):
    idx = [i for i, c in enumerate(cases) if source in (None, c["source"])]
    agree = sum(verdicts[i] == cases[i]["label"] for i in idx)
    fp = sum(verdicts[i] and not cases[i]["label"] for i in idx)
    fn = sum(cases[i]["label"] and not verdicts[i] for i in idx)
    return len(idx), 100.0 * agree / max(len(idx), 1), fp, fn


def ms(x: float) -> str:
    return f"{1e3 * x:8.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--gsm8k", type=int, default=300, help="GSM8K test problems to sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-math-verify", action="store_true")
    ap.add_argument("--show", type=int, default=20, help="minissb disagreements to print")
    args = ap.parse_args()
    if not (args.data / "HuggingFaceH4__MATH-500").is_dir():
        sys.exit(f"error: no dataset mirror at {args.data}; pass --data (see shared/data/README.md)")

    cases = load_cases(args.data, args.gsm8k, args.seed)
    checkers = {"minissb": grader.grade, "exact match": exact_match}
    if not args.no_math_verify:
        checkers["Math-Verify"] = make_math_verify()

    # Pay one-off costs (sympy and mpmath imports) before timing; then start from cold caches.
    grader.is_equivalent(r"\frac{1}{\sqrt{3}}", r"\frac{\sqrt{3}}{3}", "math500")
    clear_grader_caches()
    results = {name: run(check, cases, name) for name, check in checkers.items()}
    cold_seconds = run_cold(cases)

    sources = ["hand", "gsm8k", "math500", "aime24"]
    counts = ", ".join(f"{s} {summary(cases, [False] * len(cases), s)[0]}" for s in sources)
    n_right = sum(c["label"] for c in cases)
    print(f"labelled cases: {len(cases)} ({counts}); {n_right} right, {len(cases) - n_right} wrong")
    print()
    head = f"{'source':<9}{'n':>6}"
    for name in checkers:
        head += f" | {name:<11}{'agree':>8}{'FP':>5}{'FN':>5}"
    print(head)
    print("-" * len(head))
    for source in sources + [None]:
        line = ""
        for name in checkers:
            n, acc, fp, fn = summary(cases, results[name][0], source)
            line += f" | {'':<11}{acc:7.2f}%{fp:5d}{fn:5d}"
        print(f"{source or 'all':<9}{n:>6}{line}")
    print()
    print(f"{'time per grade() call (ms)':<28}{'median':>9}{'p99':>9}{'max':>9}{'total s':>9}")
    timings = {name: results[name][1] for name in checkers}
    timings["minissb, cold caches"] = cold_seconds
    for name, seconds in timings.items():
        s = sorted(seconds)
        p99 = s[min(len(s) - 1, int(0.99 * len(s)))]
        print(f"{name:<28}{ms(statistics.median(s))} {ms(p99)} {ms(s[-1])} {sum(s):8.2f}")

    verdicts = results["minissb"][0]
    wrong = [i for i, c in enumerate(cases) if verdicts[i] != c["label"]]
    if wrong and args.show:
        print(f"\nminissb disagreements with the labels ({len(wrong)}):")
        for i in wrong[: args.show]:
            c = cases[i]
            kind = "FP" if verdicts[i] else "FN"
            print(f"  {kind} [{c['source']}] gold={c['gold']!r} why={c['why']!r}")
            print(f"      extracted={grader.extract_answer(c['response'], c['dataset'])!r}")


if __name__ == "__main__":
    main()
