"""Answer checking for GSM8K, MATH500 and AIME 2024: extract, compare, group.

Every SSB stage turns on this module: which rollouts are right, which wrong answer is the
most common one, whether the teacher's solution is still right, and the accuracy tables.
This file is what every dataset needs; the LaTeX parser, MATH500's answer structures and the
comparison by value are minissb.mathgrade (rational, parse_answer, answers_equal).

Read top to bottom:
  extract  the content of the last \\boxed{...} (for a list gold, the boxes that end the
           response together: "\\boxed{2} and \\boxed{-3}"), else, for a response that
           ended on its own, a per-dataset answer phrase
  clean    string-level LaTeX cosmetics: $, \\left, \\dfrac, units, degrees, \\%, \\!
  numbers  a GSM8K/AIME answer as an exact rational: 1,080 / \\$18.00 / 50\\% / x = 5
  compare  is_equivalent: as numbers where the dataset's gold is one, else as structures;
           grade = extract_answer + is_equivalent
  group    group_answers: equivalent answers in one group, by is_equivalent itself (SSB's
           most common wrong answer, eval's majority vote)

Bounded time on any input: extraction is linear, reads only the tail for fallbacks and joins
at most MAX_JOINED_BOXES boxes, each sought within one answer's length of the next; answers
longer than MAX_ANSWER_CHARS are compared as strings; minissb.mathgrade bounds the rest.
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

from minissb import mathgrade
from minissb.mathgrade import MAX_ANSWER_CHARS  # also bounds extraction and numbers here

DATASETS = ("gsm8k", "math500", "aime24")
TAIL_CHARS = 2000  # fallback phrases are searched in the response's last characters only


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------- extraction

_BRACE_RE = re.compile(r"\\.|[{}]", re.S)  # escaped chars (\{ \}) do not open or close groups
_HASH_RE = re.compile(r"####[ \t]*([^\n]+)")
_PHRASE_RE = re.compile(r"(?:final answer|the answer)(?:\s+is|\s*[:=])?[\s*:]*([^\n]+)", re.I)
_MATH_SPAN_RE = re.compile(r"\$+([^$]+)\$+|\\\((.+?)\\\)|\\\[(.+?)\\\]")


def _closing_brace(text: str, j: int, end: int | None = None) -> int:
    """Index of the } that closes the { at text[j], looking no further than `end`; else -1."""
    depth = 0
    for m in _BRACE_RE.finditer(text, j, len(text) if end is None else end):
        depth += {"{": 1, "}": -1}.get(m.group(), 0)
        if depth == 0:
            return m.start()
    return -1


def _box_start(text: str, lo: int, hi: int) -> int:
    """Index of the last \\boxed / \\fbox starting in text[lo:hi], or -1."""
    return max(text.rfind("\\boxed", lo, hi), text.rfind("\\fbox", lo, hi))


def _box_at(text: str, i: int, end: int) -> tuple[str | None, int]:
    """(content, index after it) of the box at text[i]; None if it does not close by `end`."""
    j = i + (6 if text.startswith("\\boxed", i) else 5)
    while j < end and text[j].isspace() and j < i + 100:
        j += 1
    if j < end and text[j] == "{":
        k = _closing_brace(text, j, end)
        return (text[j + 1 : k].strip(), k + 1) if k >= 0 else (None, end)
    m = re.match(r"[^\s$]+", text[j : min(j + 200, end)])  # `\boxed 5`
    return (m.group().rstrip(".,;"), j + m.end()) if m else (None, j)


# What may stand between boxes that state one answer together: "$\boxed{2}$ and $\boxed{-3}$",
# "x = \boxed{2} \quad\text{or}\quad x = \boxed{-3}". No newline, no sentence end, no other word.
_BOX_GAP_RE = re.compile(
    r"(?:[ \t$,;&~{}]|\\[()\[\],;:! ]|\\\\|\\q?quad|\\text(?:rm)?|\b(?:and|or)\b"
    r"|[a-zA-Z](?:_\{?\w+\}?)?\s*=)*"
)
BOX_GAP_CHARS = 80  # 3x the longest connector above (28 chars)
MAX_JOINED_BOXES = 10  # the longest list gold in MATH500 has 3 elements


def _boxes_before(text: str, i: int) -> list[str]:
    """Contents of the boxes joined to the box at text[i] by connectors only, in text order.
    Each step looks back at most one answer and one gap: bounded on any input."""
    out: list[str] = []
    while len(out) < MAX_JOINED_BOXES - 1:
        k = _box_start(text, max(0, i - MAX_ANSWER_CHARS - BOX_GAP_CHARS), i)
        if k < 0:
            break
        content, after = _box_at(text, k, i)  # a box around text[i] does not close before i
        gap = text[after:i]
        if not content or len(gap) > BOX_GAP_CHARS or not _BOX_GAP_RE.fullmatch(gap):
            break
        out.append(content)
        i = k
    return out[::-1]


def _gold_is_list(gold, dataset: str) -> bool:
    """Is the gold several values (a solution list, a set, 1 \\pm \\sqrt{19})?"""
    if not isinstance(gold, str):
        return False
    try:
        gold = _gold_text(gold, dataset)
        if dataset in ("gsm8k", "aime24") and _number(gold) is not None:
            return False
        return _parse_answer(gold)[0] in ("list", "set")
    except Exception:  # extraction must not fail on an odd gold: treat it as a single answer
        return False


def _phrase_answer(s: str) -> str | None:
    for _ in range(10):  # "Final Answer: The final answer is $18$." -> the innermost phrase
        m = _PHRASE_RE.search(s)
        if not m:
            break
        s = m.group(1)
    s = s.strip().strip("*").strip()
    m = _MATH_SPAN_RE.search(s)
    if m:
        s = next(g for g in m.groups() if g is not None)
    else:  # plain text: stop at the end of the sentence ("18. I hope", "18, which is")
        s = re.split(r"\.\s|,\s+(?=[a-zA-Z]{2})", s, maxsplit=1)[0]
    return s.strip().rstrip(".,;").strip() or None


def extract_answer(
    text: str, dataset: str, *, fallback: bool = True, finished: bool = True,
    gold: str | None = None,
) -> str | None:
    """The final answer written in a model response, or None when there is none.

    The content of the LAST \\boxed{...} (also \\fbox{...}, `\\boxed 5`), nested braces allowed;
    a box that never closes means the response was cut off: None. For a gold of several
    values (a list, a set, a \\pm), the boxes that end the response together, joined only by
    connectors on one line ("$\\boxed{2}$ and $\\boxed{-3}$"), are one list "2, -3"; else a
    rollout that boxes intermediate values is judged by its last box.
    Without a box, only with fallback=True and finished=True (not cut off by the token limit,
    where a phrase may be about a part of the problem), the last answer phrase in the tail:
    "#### X" (gsm8k), "The answer is X", "Final answer: X" (its first $...$ span if any).
    Never a bare trailing number: in a truncated rollout that is an intermediate value.
    """
    _check_dataset(dataset)
    if not isinstance(text, str):
        return None
    i = _box_start(text, 0, len(text))
    if i >= 0:
        content, _ = _box_at(text, i, len(text))
        if content and gold is not None and _gold_is_list(gold, dataset):
            content = ", ".join(_boxes_before(text, i) + [content])
        return content or None
    if not (fallback and finished):
        return None
    tail = text[-TAIL_CHARS:]
    hits = _HASH_RE.findall(tail) if dataset == "gsm8k" else []
    hits = hits or _PHRASE_RE.findall(tail)
    return _phrase_answer(hits[-1]) if hits else None


# ----------------------------------------------------------------------------- cleaning

_UNICODE = str.maketrans({
    "\u2212": "-", "\u2013": "-", "\u00d7": "\\times ", "\u00f7": "\\div ", "\u00b7": "\\cdot ",
    "\u03c0": "\\pi ", "\u221e": "\\infty ", "\u221a": "\\sqrt", "\u2264": "\\leq ",
    "\u2265": "\\geq ", "\u00b0": "", "\u00a0": " ", "\u222a": "\\cup ",
})
_TEXT_CMDS = r"text|textbf|textit|textrm|textnormal|textsf|texttt|mbox|hbox"
_FONT_CMDS = r"mathrm|mathbf|mathit|mathsf|boldsymbol|operatorname|mathbb"
_WRAP_RE = re.compile(rf"\\({_TEXT_CMDS}|{_FONT_CMDS}|boxed|fbox)\s*\{{")
_UNITS_NOSPACE = r"cm|mm|km|ft|kg|mg|lbs?|oz|sec|hrs?|mph|ml|mL|sq"
# Unit words trailing a number or a closing bracket: "15 cm^2", "5.4 cents", "\frac{270}{7} degrees".
_UNIT_TAIL_RE = re.compile(
    rf"(?<=[\d}})\].])(?:\s+[a-zA-Z]{{2,}}\.?|\s*(?:{_UNITS_NOSPACE})(?![a-zA-Z]))"
    r"(?:\s*\^\s*\{?\d\}?)?(?:\s+[a-zA-Z]{2,}\.?(?:\s*\^\s*\{?\d\}?)?)*\s*$"
)
_REPEATING_RE = re.compile(r"(\d*)\.(\d*)\\overline\s*\{(\d+)\}")
_CLEAN_SUBS = [
    (re.compile(r"\\[$%]|[$%]"), ""),  # currency and percent signs
    (re.compile(r"(?<!\\)\\[()\[\]]"), ""),  # \( \) \[ \] math delimiters
    (re.compile(r"(\d)(?:,\\!\s*|\{,\})(?=\d)"), r"\1,"),  # 10,\!080 and 10{,}080 -> 10,080
    (re.compile(r"\\(?:left|right|[bB]igg?[lr]?|displaystyle)(?![a-zA-Z])\s*\.?"), ""),
    (re.compile(r"\\[dtc]frac(?![a-zA-Z])"), r"\\frac"),
    (re.compile(r"\\[dt]binom(?![a-zA-Z])"), r"\\binom"),
    (re.compile(r"\\(?:leqslant|leq|le)(?![a-zA-Z])"), r"\\leq "),
    (re.compile(r"\\(?:geqslant|geq|ge)(?![a-zA-Z])"), r"\\geq "),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])"), ""),
    (re.compile(r"\\varnothing(?![a-zA-Z])|\\\{\s*\\\}"), r"\\emptyset"),
    (re.compile(r"(?<!\\)\\[,;:! >]|\\q?quad(?![a-zA-Z])|~"), " "),  # spacing, not \\
    (re.compile(r"\s+(?:and|or)\s+"), ","),
    (re.compile(r"\\frac\s*(\d)\s*(\d)"), r"\\frac{\1}{\2}"),  # \frac43
    (re.compile(r"\\frac\s*(\d)\s*\{"), r"\\frac{\1}{"),  # \frac5{9}
    (re.compile(r"\\frac\s*(\{[^{}]*\})\s*(\d)"), r"\\frac\1{\2}"),  # \frac{270}7
    (re.compile(r"\\sqrt\s*(\d)"), r"\\sqrt{\1}"),  # \sqrt2
    # mixed numbers: 1\frac{4}{5} is 1 + 4/5, not 1 * 4/5
    (re.compile(r"(?<![\w.}^)\]\\])(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}"), r"(\1+\\frac{\2}{\3})"),
    (re.compile(r"\s+"), " "),
]


def _repeating_decimal(m: re.Match) -> str:
    whole, fixed, cycle = m.group(1) or "0", m.group(2), m.group(3)
    if len(fixed) + len(cycle) > 50:
        return m.group()
    # 0.1(6) = (16 - 1) / 90: digits with one cycle minus digits without, over 9..90..0
    num = int(whole + fixed + cycle) - int(whole + fixed)
    den = (10 ** len(cycle) - 1) * 10 ** len(fixed)
    return f"\\frac{{{num}}}{{{den}}}"


def _unwrap(s: str) -> str:
    """Replace \\text{..}, \\mathrm{..}, \\boxed{..}, ... by their content (text gets spaces)."""
    for _ in range(50):
        m = _WRAP_RE.search(s)
        if not m:
            break
        end = _closing_brace(s, m.end() - 1)
        if end < 0:  # unbalanced: drop the command name only
            s = s[: m.start()] + s[m.end() - 1 :]
            continue
        pad = " " if re.fullmatch(_TEXT_CMDS, m.group(1)) else ""
        s = s[: m.start()] + pad + s[m.end() : end] + pad + s[end + 1 :]
    return s


def _clean(s: str) -> str:
    s = _unwrap(s.translate(_UNICODE))
    s = _REPEATING_RE.sub(_repeating_decimal, s)  # 1.\overline{3}
    for pattern, repl in _CLEAN_SUBS:
        s = pattern.sub(repl, s)
    s = _UNIT_TAIL_RE.sub("", s).strip().rstrip(".").strip()
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):  # 58,500 (a whole-answer number)
        s = s.replace(",", "")
    return s


# ----------------------------------------------------------------------------- numbers
# Both parses are cached (gold answers repeat across calls), but not for long strings: a
# megabyte key would stay in memory.


def _number(answer: str) -> Fraction | None:
    """Value of a GSM8K/AIME-style answer: 1,080 / \\$18.00 / 50\\% / 18 dollars / x = 5."""
    return None if len(answer) > MAX_ANSWER_CHARS else _number_cached(answer)


@lru_cache(maxsize=16384)
def _number_cached(answer: str) -> Fraction | None:
    s = _unwrap(answer)
    for word, power in (("thousand", 3), ("million", 6), ("billion", 9)):  # 1.45 million
        s = re.sub(rf"(\d)\s*{word}\b", rf"\1\\times10^{{{power}}}", s)
    s = _clean(s)
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # thousands separators anywhere
    if re.fullmatch(r"[-+]?\d{1,3}(?: \d{3})+(?:\.\d+)?", s):  # 1 234 (or 1\,234)
        s = s.replace(" ", "")
    s = s.rsplit("=", 1)[-1]  # "x = 5", "2 \times 9 = 18": the value after the last "="
    s = re.sub(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}", " ", s)  # leftover unit words
    s = re.sub(r"(\d)[eE]([-+]?\d{1,3})(?![\d.])", r"\1\\times10^{\2}", s)  # 1.5e3
    return mathgrade.rational(s)


def _parse_answer(answer: str):
    """The structure of a MATH-style answer (see minissb.mathgrade)."""
    if len(answer) > MAX_ANSWER_CHARS:
        return mathgrade.as_string(answer)
    return _parse_answer_cached(answer)


@lru_cache(maxsize=16384)
def _parse_answer_cached(answer: str):
    return mathgrade.parse_answer(_clean(answer))


def _gold_text(gold: str, dataset: str) -> str:
    if dataset == "gsm8k" and "####" in gold:  # a whole GSM8K solution was passed
        return gold.rsplit("####", 1)[1]
    return gold


# ----------------------------------------------------------------------------- public API


def is_equivalent(pred: str | None, gold: str, dataset: str) -> bool:
    """True when the extracted answer `pred` means the same as the gold answer.

    gsm8k, aime24: both sides as exact numbers (commas, $, %, units, 18.00, 025, \\frac{1}{2}
    = 0.5, "x = 5"); a gold that is not a number is compared like math500.
    math500: by structure (brackets of tuples and intervals, sets, unordered lists, \\pm,
    matrices, equations, labelled values "(p,q) = (3,2)" or "y = ..." against bare ones,
    inequalities, the last side of "x = 5+6 = 11"), then per element by value: exactly for
    rationals, else at three points plus sympy. Not symmetric in one rule: a factored `pred`
    is right for an expanded `gold`, not the other way round (see mathgrade._factored).
    """
    _check_dataset(dataset)
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    gold = _gold_text(gold, dataset)
    try:
        if dataset in ("gsm8k", "aime24"):
            g = _number(gold)
            if g is not None:
                p = _number(pred)
                return p is not None and p == g
        return mathgrade.answers_equal(_parse_answer(pred), _parse_answer(gold))
    except Exception:  # a bug must not take down a whole evaluation run: judge it wrong
        return False


def grade(response_text: str, gold: str, dataset: str, *, finished: bool = True) -> bool:
    """Is the final answer of a model response correct? (extract_answer + is_equivalent)

    finished=False: the response was cut off by the token limit; only a closed box counts.
    """
    answer = extract_answer(response_text, dataset, finished=finished, gold=gold)
    return is_equivalent(answer, gold, dataset)


def group_answers(answers: list[str | None], dataset: str) -> list[list[int]]:
    """Indices of `answers` in groups of equivalent answers: the one meaning of "same answer".

    An answer joins the first group whose FIRST MEMBER, as the gold, it equals or is
    equivalent to, else starts one; None is in no group. Groups come in order of their first
    member, indices ascending ("1,000", "1000.0", "$1000": one group). The gold side matters
    in one rule (see is_equivalent): "(x-1)(x+2)" after "x^2+x-2" joins it, not the other way
    round. SSB's most common wrong answer: the right answers passed as None, the largest
    group, ties drawn by the caller. Majority vote: max(groups, key=len), the first largest.
    """
    _check_dataset(dataset)
    groups: list[list[int]] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for g in groups:
            first = answers[g[0]]
            if a == first or is_equivalent(a, first, dataset):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups
