"""How far apart two eval.py responses files are, problem by problem (the experiment's README).

    python results/ssb-coder1.5b-cpu/compare.py A.jsonl B.jsonl

Over the problems both files answered (greedy, one response each): how many responses are the
same text, where the first differing text starts (in characters, the median), and how the
verdicts pair up (both right, only A, only B, both wrong). It says whether two runs differ at
all, which eval.py's accuracy table cannot: two models can score the same with other texts.
"""

import json
import statistics
import sys


def records(path: str) -> dict[str, dict]:
    with open(path) as f:
        return {r["id"]: r["responses"][0] for r in map(json.loads, f)}


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(path_a: str, path_b: str) -> None:
    a, b = records(path_a), records(path_b)
    ids = [i for i in a if i in b]
    same = [i for i in ids if a[i]["text"] == b[i]["text"]]
    starts = [first_difference(a[i]["text"], b[i]["text"]) for i in ids if i not in same]
    pairs = {(x, y): sum(a[i]["correct"] == x and b[i]["correct"] == y for i in ids)
             for x in (True, False) for y in (True, False)}
    print(f"{len(ids)} problems in both; {len(same)} identical texts ({100 * len(same) / len(ids):.0f}%)")
    if starts:
        print(f"where texts differ, the first difference is at character {statistics.median(starts):.0f} (median)")
    print(f"both right {pairs[True, True]}, only A right {pairs[True, False]}, "
          f"only B right {pairs[False, True]}, both wrong {pairs[False, False]}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
