"""Tests for minissb.grader: extraction, equivalence rules, groups, robustness, real golds."""

import json
import random
import re
import signal
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minissb import grader
from minissb.grader import (
    extract_answer,
    grade,
    group_answers,
    is_equivalent,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"needs the dataset mirror at {DATA} (../shared/data)"
)


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"First \boxed{3}, then finally \boxed{5}.", "5"),
        (r"so $\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not close the box
        (r"answer: \boxed 5.", "5"),
        (r"\fbox{42}", "42"),
        (r"\boxed {7}", "7"),
        (r"\boxed{\boxed{8}}", "8"),  # the innermost box is the last one
        (r"The answer is \boxed{1,080} dollars", "1,080"),
    ],
)
def test_extract_boxed(text, expected):
    for dataset in grader.DATASETS:
        assert extract_answer(text, dataset) == expected


def test_extract_none_when_cut_off_or_absent():
    assert extract_answer(r"so the total is \boxed{\frac{3}{", "math500") is None
    assert extract_answer(r"earlier \boxed{4} but then \boxed{1", "gsm8k") is None
    assert extract_answer(r"put it in \boxed{}", "gsm8k") is None
    # A bare trailing number is an intermediate value of an unfinished rollout, not an answer.
    assert extract_answer("First, 16 - 3 - 4 = 9 eggs. Then 9 * 2 = 18", "gsm8k") is None
    assert extract_answer("", "aime24") is None
    assert extract_answer(None, "aime24") is None


def test_extract_fallback_phrases():
    assert extract_answer("She earns 18 a day.\n#### 18", "gsm8k") == "18"
    assert extract_answer("She earns 18 a day.\n#### 18", "math500") is None  # #### is GSM8K's
    assert extract_answer("So the answer is 1,080.", "gsm8k") == "1,080"
    assert extract_answer("The answer is $\\frac{3}{4}$.", "math500") == "\\frac{3}{4}"
    text = "Final Answer: The final answer is $204$. I hope it is correct."
    assert extract_answer(text, "aime24") == "204"
    assert extract_answer("The final answer is 18. I hope it is correct.", "gsm8k") == "18"
    assert extract_answer("the answer is 18, which is the total", "gsm8k") == "18"
    assert extract_answer("So the answer is 18.", "gsm8k", fallback=False) is None
    # the box wins over phrases, even earlier ones
    assert extract_answer("The answer is 3.\nActually \\boxed{4}", "gsm8k") == "4"


def test_extract_megabyte_and_odd_text():
    big = "x" * 1_000_000 + r"\boxed{12}"
    assert extract_answer(big, "gsm8k") == "12"
    assert extract_answer(r"\boxed{" + "{" * 200_000, "math500") is None
    assert extract_answer("\\boxed{" + "a" * 1_000_000 + "}", "math500") == "a" * 1_000_000


def test_extract_only_box_when_no_fallback_or_cut_off():
    # fallback=False: the last \boxed{} or nothing, never a phrase
    assert extract_answer("So the answer is 18.", "math500", fallback=False) is None
    assert extract_answer("She earns 18 a day.\n#### 18", "gsm8k", fallback=False) is None
    assert extract_answer(r"so \boxed{18}. The answer is 19.", "gsm8k", fallback=False) == "18"
    # finished=False: cut off by the token limit; a phrase there may be about one part
    cut = "Let us do part one first. So the answer to part one is 14"
    for dataset in grader.DATASETS:
        assert extract_answer(cut, dataset, finished=False) is None
        assert not grade(cut, "14", dataset, finished=False)
    assert extract_answer("Hence the answer is 14.\n#### 14", "gsm8k", finished=False) is None
    assert extract_answer("The answer is 14.", "gsm8k", fallback=False, finished=True) is None
    # a closed box still counts in a cut-off response
    assert extract_answer(r"so $\boxed{14}$. Now part two: we", "gsm8k", finished=False) == "14"
    assert grade(r"so $\boxed{14}$. Now part two: we", "14", "gsm8k", finished=False)
    assert extract_answer("So the answer is 14.", "gsm8k", finished=True) == "14"


# Several boxes that end the response together are one list answer, for a list gold only.
# (text, gold, extracted with that gold, extracted without a gold: always the last box)
ROOTS = r"The roots are $\boxed{2}$ and $\boxed{-3}$."
JOINED_BOXES = [
    (ROOTS, "-3, 2", "2, -3", "-3"),
    (ROOTS, r"\{2,-3\}", "2, -3", "-3"),
    (r"$x = \boxed{2}$ or $x = \boxed{-3}$", "-3, 2", "2, -3", "-3"),
    (r"\[ x_1 = \boxed{2} \quad \text{or} \quad x_2 = \boxed{-3} \]", "-3, 2", "2, -3", "-3"),
    (r"$\boxed{1+\sqrt{19}}, \boxed{1-\sqrt{19}}$", r"1 \pm \sqrt{19}",
     r"1+\sqrt{19}, 1-\sqrt{19}", r"1-\sqrt{19}"),
    (r"\boxed{-2}, \boxed{1\pm\sqrt5}", r"\{1\pm\sqrt{5},-2\}", r"-2, 1\pm\sqrt5", r"1\pm\sqrt5"),
    # intermediate boxes in an earlier sentence or line are not part of the answer
    (r"We get \boxed{5}. So the roots are \boxed{2} and \boxed{-3}.", "-3, 2", "2, -3", "-3"),
    ("First \\boxed{4}.\nThe roots are \\boxed{2} and \\boxed{-3}", "-3, 2", "2, -3", "-3"),
    ("\\boxed{2}\n\\boxed{-3}", "-3, 2", "-3", "-3"),
    (r"\boxed{2} which gives \boxed{-3}", "-3, 2", "-3", "-3"),  # words between: not one answer
    (r"x = 2 is a root. The other root is \boxed{-3}.", "-3, 2", "-3", "-3"),
    (r"\boxed{2} and \boxed{-3", "-3, 2", None, None),  # cut off in the last box
    # a single-value gold reads the last box alone
    (ROOTS, "-3", "-3", "-3"),
    (r"First \boxed{3}, then finally \boxed{5}.", "5", "5", "5"),
    (r"\boxed{18} and \boxed{2}", "Janet sells 9 eggs.\n#### 18", "2", "2"),
]


@pytest.mark.parametrize("text, gold, with_gold, without", JOINED_BOXES)
def test_extract_joins_final_boxes_for_a_list_gold(text, gold, with_gold, without):
    dataset = "gsm8k" if "####" in gold else "math500"
    assert extract_answer(text, dataset, gold=gold) == with_gold
    assert extract_answer(text, dataset) == without


def test_grade_joined_boxes_and_traps():
    assert grade(r"The roots are $\boxed{2}$ and $\boxed{-3}$.", "-3, 2", "math500")
    assert grade(r"The roots are $\boxed{2}$ and $\boxed{-3}$.", r"\{2,-3\}", "math500")
    assert not grade(r"The roots are $\boxed{2}$ and $\boxed{3}$.", "-3, 2", "math500")
    assert not grade(r"We get \boxed{2}. The other root is \boxed{-3}.", "-3, 2", "math500")
    assert not grade(r"\boxed{2}, \boxed{-3} and \boxed{5}", "-3, 2", "math500")
    assert not grade(r"The roots are $\boxed{2}$ and $\boxed{-3}$.", "2", "math500")


def test_extract_joined_boxes_bounded():
    many = r"\boxed{1} and " * 200_000 + r"\boxed{2}"
    joined = extract_answer(many, "math500", gold="1, 2")
    assert joined.count(",") == grader.MAX_JOINED_BOXES - 1 and joined.endswith("2")
    spread = (r"\boxed{1}" + " " * 79) * 20_000 + r"\boxed{2}"
    assert extract_answer(spread, "math500", gold="1, 2").endswith("1, 2")
    huge = r"\boxed{" + "1 and " * 200_000 + r"} and \boxed{2}"  # an earlier box too long to join
    assert extract_answer(huge, "math500", gold="1, 2") == "2"
    unclosed = r"\boxed{" * 100_000 + r"1} and \boxed{2}"
    assert extract_answer(unclosed, "math500", gold="1, 2") in ("1, 2", "2")


@pytest.mark.parametrize("fn", [extract_answer, lambda a, dataset: group_answers([a], dataset)])
def test_unknown_dataset_raises_value_error_naming_valid(fn):
    with pytest.raises(ValueError, match="gsm8k, math500, aime24"):
        fn("5", "gsm8k_test")


def test_unknown_dataset_raises_for_all_entry_points():
    for call in (
        lambda: is_equivalent("5", "5", "math"),
        lambda: grade(r"\boxed{5}", "5", "aime"),
        lambda: group_answers(["5"], "MATH500"),
    ):
        with pytest.raises(ValueError, match="unknown dataset"):
            call()


# ----------------------------------------------------------------------------- numeric rules


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("1,080", "1080", True),
        ("1080", "1,080", True),
        ("1,450,000", "1450000", True),
        (r"\$18", "18", True),
        ("$18$", "18", True),
        ("18.00", "18", True),
        ("18.0", "18", True),
        ("18.5", "18", False),
        ("18 dollars", "18", True),
        (r"18 \text{ eggs}", "18", True),
        (r"\text{18 dollars}", "18", True),
        (r"50\%", "50", True),
        ("50%", "50", True),
        (r"\frac{1}{2}", "0.5", True),
        (r"\dfrac{3}{4}", ".75", True),
        ("1/2", "0.5", True),
        ("-10", "-10", True),
        ("10", "-10", False),
        ("+5", "5", True),
        ("x = 5", "5", True),
        (r"2 \times 9 = 18", "18", True),
        ("1.5e3", "1500", True),
        (r"1.45 \text{ million}", "1,450,000", True),
        ("108", "1080", False),
        ("1,08", "108", False),  # not a thousands separator: a list, so no number
        (r"3 \text{ hours and } 20 \text{ minutes}", "3", False),
        ("", "18", False),
        ("eighteen", "18", False),
    ],
)
def test_gsm8k_numeric_equivalence(pred, gold, expected):
    assert is_equivalent(pred, gold, "gsm8k") is expected


def test_gsm8k_gold_can_be_a_whole_solution():
    assert is_equivalent("18", "Janet sells 9 eggs.\n9 * 2 = 18\n#### 18", "gsm8k")


@pytest.mark.parametrize(
    "pred, gold, expected",
    [("25", "025", True), ("025", "025", True), ("25.0", "025", True), ("0025", "025", True),
     ("52", "025", False), ("250", "025", False), ("-25", "025", False)],
)
def test_aime_integer_equivalence(pred, gold, expected):
    assert is_equivalent(pred, gold, "aime24") is expected


# ----------------------------------------------------------------------------- MATH500 rules

MATH_CASES = [
    # fractions, spacing, \left/\right
    (r"\dfrac{14}{3}", r"\frac{14}{3}", True),
    (r"\tfrac{14}{3}", r"\frac{14}{3}", True),
    (r"\frac 43", r"\frac43", True),
    (r"14/3", r"\frac{14}{3}", True),
    (r"\frac{14}{4}", r"\frac{14}{3}", False),
    (r"\frac{270}{7}", r"\frac{270}7\text{ degrees}", True),
    (r"(3,\pi/2)", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"(3,\pi)", r"\left( 3, \frac{\pi}{2} \right)", False),
    # units, degrees, percent, dollars, thousands separators
    ("90", r"90^\circ", True),
    (r"90^{\circ}", r"90^\circ", True),
    (r"90 \text{ degrees}", r"90^\circ", True),
    (r"\frac{\pi}{2}", r"90^\circ", False),
    ("15", r"15\mbox{ cm}^2", True),
    (r"15 \text{ cm}^2", r"15\mbox{ cm}^2", True),
    ("16", r"15\mbox{ cm}^2", False),
    ("5.4", r"5.4 \text{ cents}", True),
    ("18.9", r"\$18.90", True),
    ("10080", r"10,\!080", True),
    ("11111111100", r"11,\! 111,\! 111,\! 100", True),
    ("32,348", r"\$32,\!348", True),
    ("10081", r"10,\!080", False),
    (r"15\%", "15", True),
    # decimals and exact values
    ("3.210", "3.21", True),
    (r"6.72 \times 10^{-5}", ".0000672", True),
    ("0.333", r"\frac{1}{3}", False),
    ("3.14", r"\pi", False),
    (r"\frac{9}{5}", r"1\frac{4}{5}", True),  # mixed number
    ("1.8", r"1\frac{4}{5}", True),
    (r"\frac{4}{5}", r"1\frac{4}{5}", False),
    ("137.5", r"137 \frac{1}{2}", True),
    # radicals, pi, complex numbers
    (r"\sqrt{117}", r"3\sqrt{13}", True),
    (r"\sqrt{116}", r"3\sqrt{13}", False),
    (r"11\sqrt{2}", r"11\sqrt2", True),
    (r"\frac{1}{\sqrt{3}}", r"\frac{\sqrt{3}}{3}", True),
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt{3}}{3}", False),
    (r"\sqrt{3+2\sqrt{2}}", r"1+\sqrt{2}", True),
    (r"2\cdot 144 \pi", r"288 \pi", True),
    (r"288", r"288 \pi", False),
    (r"-5i+6", "6 - 5i", True),
    ("6+5i", "6 - 5i", False),
    # symbolic expressions
    ("2(k+1)", "2k+2", True),
    ("2k+1", "2k+2", False),
    ("(b+2)(a+5)", "(a+5)(b+2)", True),
    ("(a+2)(b+5)", "(a+5)(b+2)", False),
    ("ab+2a+5b+10", "(a+5)(b+2)", False),  # "Factor ab+5b+2a+10": the question restated
    ("x^2+2x+1", "(x+1)^2", False),
    # a factored answer for an expanded gold is the same polynomial ("Find the quotient")
    ("(x-1)(x^4+x^2+1)", "x^5 - x^4 + x^3 - x^2 + x - 1", True),
    (r"\frac{\cos x}{\sin x}", r"\cot x", True),
    (r"\tan x", r"\cot x", False),
    ("-q+p", "p - q", True),
    ("q - p", "p - q", False),
    ("x^3+3x-6", "x^3+3x-6", True),
    ("y^3+3y-6", "x^3+3x-6", False),  # a different variable is a different answer
    # tuples and intervals: order and bracket type matter
    ("(-29,15)", "(15,-29)", False),
    ("(15, -29)", "(15,-29)", True),
    ("(3,4)", "(3,4]", False),
    ("[3,4]", "(3,4]", False),
    (r"\left(3, 4\right]", "(3,4]", True),
    (r"(-\infty,0]", r"(-\infty, 0]", True),
    (r"(-\infty,0)", r"(-\infty, 0]", False),
    (r"(9,36) \cup (0,9)", r"(0,9) \cup (9,36)", True),
    (r"(0,36)", r"(0,9) \cup (9,36)", False),
    ("[-2,7]", r"x \in [-2,7]", True),
    (r"-2 \le x \le 7", r"x \in [-2,7]", True),
    (r"-2 < x \le 7", r"x \in [-2,7]", False),
    ("x > 2", r"(2,\infty)", True),
    # unordered solution lists, sets, plus-minus
    ("-2, 1", "1,-2", True),
    ("1, 2", "1,-2", False),
    ("1", "1,-2", False),
    ("7, 3, 5", "3, 5, 7", True),
    (r"x = 1 \text{ or } x = -2", "1,-2", True),
    (r"1+\sqrt{19}, 1-\sqrt{19}", r"1 \pm \sqrt{19}", True),
    (r"1+\sqrt{19}", r"1 \pm \sqrt{19}", False),
    (r"\{-2, 1-\sqrt5, 1+\sqrt5\}", r"\{1\pm\sqrt{5},-2\}", True),
    (r"\{-2, 1+\sqrt5\}", r"\{1\pm\sqrt{5},-2\}", False),
    # matrices
    (
        r"\begin{pmatrix} -\frac13 \\ \frac{2}{3} \\ \frac{5}{3} \end{pmatrix}",
        r"\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}",
        True,
    ),
    (
        r"\begin{bmatrix} -1 & 0 \\ 0 & -1 \end{bmatrix}",
        r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}",
        True,
    ),
    (
        r"\begin{pmatrix} -1 & 0 \\ 0 & 1 \end{pmatrix}",
        r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}",
        False,
    ),
    (r"\begin{pmatrix} 1/5 \\ -18/5 \end{pmatrix}", r"\begin{pmatrix} 1/5 & -18/5 \end{pmatrix}", False),
    # equations: "y = ..." vs the bare right side; scaled equations
    ("2x + 3", "y = 2x + 3", True),
    ("y = 3 + 2x", "y = 2x + 3", True),
    ("2x - y + 3 = 0", "y = 2x + 3", True),
    ("y = 2x - 3", "y = 2x + 3", False),
    ("5", "x=5", True),
    ("x = 5", "5", True),
    ("-10x + 14y - 22z - 8 = 0", "5x - 7y + 11z + 4 = 0", True),
    ("5x - 7y + 11z - 4 = 0", "5x - 7y + 11z + 4 = 0", False),
    # multiple choice, text answers, bases
    ("C", r"\text{(C)}", True),
    ("(C)", r"\text{(C)}", True),
    (r"\textbf{(C)}", r"\text{(C)}", True),
    ("(D)", r"\text{(C)}", False),
    ("Evelyn", r"\text{Evelyn}", True),
    (r"\text{evelyn}", r"\text{Evelyn}", True),
    ("Navin", r"\text{Evelyn}", False),
    ("52_{8}", "52_8", True),
    ("52", "52_8", True),  # the base was asked for; digits match
    ("42", "52_8", False),  # 52_8 in decimal is not what was asked
    ("52_9", "52_8", False),
]


@pytest.mark.parametrize("pred, gold, expected", MATH_CASES)
def test_math500_equivalence(pred, gold, expected):
    assert is_equivalent(pred, gold, "math500") is expected

COL3 = r"\begin{pmatrix} 1 \\ 2 \\ 3 \end{pmatrix}"
ID2 = r"\begin{pmatrix} 1 & 0 \\ 0 & 1 \end{pmatrix}"

# Answer forms of issue 13, each beside a near miss that must stay wrong.
FORM_CASES = [
    # 1. a column vector written as a tuple (and the reverse)
    ("(1,2,3)", COL3, True),
    (COL3, "(1,2,3)", True),
    (r"(x,y,z) = (1,2,3)", COL3, True),
    ("(1,3,2)", COL3, False),  # order
    ("(1,2)", COL3, False),  # length
    ("(1,2,3]", COL3, False),  # an interval bracket is no vector
    ("(1,2,3)", r"\begin{pmatrix} 1 & 2 & 3 \end{pmatrix}", False),  # a row is another shape
    # 2. a scalar times a matrix or vector
    (r"2\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}2\\4\end{pmatrix}", True),
    (r"\frac{1}{2}\begin{pmatrix}2\\4\end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", True),
    (r"-\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}-1\\-2\end{pmatrix}", True),
    (r"3 \cdot" + ID2, r"\begin{pmatrix} 3 & 0 \\ 0 & 3 \end{pmatrix}", True),
    (r"\begin{pmatrix}2\\4\end{pmatrix}", r"\frac{1}{\sqrt{2}}\begin{pmatrix}\sqrt8\\4\sqrt2\end{pmatrix}", True),
    (r"2\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}2\\3\end{pmatrix}", False),
    (r"\frac{1}{2}\begin{pmatrix}2\\4\end{pmatrix}", r"\begin{pmatrix}2\\4\end{pmatrix}", False),
    # 3. \mathbf{I}, -\mathbf{I}: the identity of the other side's size
    (r"\mathbf{I}", ID2, True),
    (r"-\mathbf{I}", r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}", True),
    (r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}", r"-\mathbf{I}", True),
    (r"2\mathbf{I}_3", r"\begin{pmatrix} 2&0&0 \\ 0&2&0 \\ 0&0&2 \end{pmatrix}", True),
    (r"-\mathbf{I}", ID2, False),
    (r"\mathbf{I}", r"\begin{pmatrix} 1 & 0 \\ 0 & -1 \end{pmatrix}", False),
    (r"\mathbf{I}_3", ID2, False),
    (r"\mathbf{I}", r"\begin{pmatrix} 1 \\ 0 \end{pmatrix}", False),  # not square
    (r"x\mathbf{I}", ID2, False),
    # 4. a factored answer for an expanded gold (not the other way: see _factored)
    ("(x-1)(x+2)", "x^2+x-2", True),
    ("(x+2)(x-1)", "(x-1)(x+2)", True),
    ("(x-1)(x+2)", "x^2-x-2", False),
    ("x^2+x-2", "(x-1)(x+2)", False),  # "Factor x^2+x-2" answered with the question
    # 5. labelled values against bare ones, either side
    ("(3,2)", "(p,q)=(3,2)", True),
    ("(p,q)=(3,2)", "(3,2)", True),
    ("(q,p)=(2,3)", "(p,q)=(3,2)", True),  # matched by name
    ("4, 5", "AB=4, CD=5", True),
    ("AB=4, CD=5", "4, 5", True),
    ("CD=5, AB=4", "AB=4, CD=5", True),
    (r"\theta = \frac{\pi}{4}", r"\frac{\pi}{4}", True),
    (r"\mathbf{v} = \begin{pmatrix} 1 \\ 2 \\ 3 \end{pmatrix}", COL3, True),
    ("(2,3)", "(p,q)=(3,2)", False),
    ("(q,p)=(3,2)", "(p,q)=(3,2)", False),
    ("AB=5, CD=4", "AB=4, CD=5", False),
    ("AB=4, CD=6", "4, 5", False),
    ("x=1, y=2", "x=2, y=1", False),
    ("ab = 4", "4", False),  # lower-case letters are a product, not a name
    ("x + y = 5", "5", False),
    # 7. \pm a against the set and the list of both signs
    (r"\pm 3", r"\{-3, 3\}", True),
    (r"\pm 3", "-3, 3", True),
    (r"\{3,-3\}", r"\pm 3", True),
    (r"x = \pm\sqrt{2}", r"-\sqrt2, \sqrt2", True),
    (r"\pm a", r"\{-a, a\}", True),
    (r"\pm 3", "3", False),
    (r"\pm 3", r"\{3\}", False),
    (r"\pm 3", r"\{-3, 3, 0\}", False),
    (r"\pm 2", r"\{-3, 3\}", False),
    # 8. an inequality the other way round
    (r"5 \geq x", r"x \leq 5", True),
    ("3 < x", "x > 3", True),
    (r"7 \geq x > -2", r"(-2,7]", True),
    (r"5 \leq x", r"x \leq 5", False),
    ("3 > x", "x > 3", False),
    (r"7 \geq x \geq -2", r"(-2,7]", False),
    # 9. a chain: its last side is the value
    ("x = 5+5+1 = 11", "11", True),
    ("x = 5+5+1 = 11", "x = 11", True),
    ("5+6 = 11", "11", True),
    ("x = 5+6 = 12", "11", False),  # the last value counts, not an earlier one
    ("x = 11 = 12", "11", False),
]


@pytest.mark.parametrize("pred, gold, expected", FORM_CASES)
def test_math500_answer_forms(pred, gold, expected):
    assert is_equivalent(pred, gold, "math500") is expected


def test_math500_equivalence_in_a_worker_thread_matches():
    # No SIGALRM outside the main thread: the numeric test decides; verdicts must not change.
    results = {}

    def run():
        results["thread"] = [is_equivalent(p, g, "math500") for p, g, _ in MATH_CASES + FORM_CASES]

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive()
    assert results["thread"] == [e for _, _, e in MATH_CASES + FORM_CASES]


def test_sympy_timer_leaves_signal_state_alone():
    previous = signal.getsignal(signal.SIGALRM)
    assert is_equivalent(r"\frac{1}{\sqrt{3}}", r"\frac{\sqrt{3}}{3}", "math500")
    assert signal.getsignal(signal.SIGALRM) is previous
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    # A caller's own running timer is neither cancelled nor replaced.
    fired = []
    handler = lambda signum, frame: fired.append(signum)  # noqa: E731
    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 100.0)
        assert is_equivalent("(b+2)(a+5)", "(a+5)(b+2)", "math500")
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 90
        assert signal.getsignal(signal.SIGALRM) is handler
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not fired


def test_grade_end_to_end():
    assert grade(r"... so she makes $\boxed{\$18}$ every day.", "18", "gsm8k")
    assert not grade(r"... so she makes $\boxed{\$19}$ every day.", "18", "gsm8k")
    assert grade(r"Thus $a = \boxed{\dfrac{14}{3}}$.", r"\frac{14}{3}", "math500")
    assert grade(r"The answer is $\boxed{25}$", "025", "aime24")
    assert not grade(r"The answer is $\boxed{25", "025", "aime24")  # cut off
    assert not grade("no answer here", "025", "aime24")


# ----------------------------------------------------------------------------- groups


GROUPS = [
    ("gsm8k", ["1080", "1,080", r"\$1080.00", "1080 pages", "x = 1080"], ["1081", "108"]),
    ("aime24", ["25", "025", "25.0"], ["250", "52"]),
    ("math500", [r"\frac{14}{3}", r"\dfrac{14}{3}", "14/3", r"\frac{28}{6}"], [r"\frac{3}{14}"]),
    ("math500", [r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}", r"\sqrt{3}/3"], [r"\sqrt{3}"]),
    ("math500", ["1,-2", "-2, 1", r"x=1 \text{ or } x=-2"], ["1,2", "(1,-2)"]),
    ("math500", ["(a+5)(b+2)", "(b+2)(a+5)", "(5+a)(2+b)"], ["(a+2)(b+5)", "ab+2a+5b+10"]),
    ("math500", ["y = 2x + 3", "2x+3", "3+2x"], ["2x-3"]),
    ("math500", [r"\text{(C)}", "C", "(C)"], ["B"]),
    ("math500", [r"90^\circ", "90"], ["91"]),
    ("math500", [COL3, "(1,2,3)", r"\frac{1}{2}\begin{pmatrix} 2 \\ 4 \\ 6 \end{pmatrix}"], ["(3,2,1)"]),
    ("math500", ["(3,2)", "(p,q)=(3,2)"], ["(2,3)"]),
    ("math500", ["x = 11", "x = 5+5+1 = 11", "11"], ["12"]),
    ("math500", [r"x \leq 5", r"5 \geq x", r"(-\infty,5]"], [r"5 \leq x"]),
]


@pytest.mark.parametrize("dataset, same, different", GROUPS)
def test_group_answers_joins_equivalent_answers(dataset, same, different):
    groups = group_answers(same + different, dataset)
    assert groups[0] == list(range(len(same))), groups
    for a in same[1:]:
        assert is_equivalent(a, same[0], dataset)
    for d in different:
        assert not is_equivalent(d, same[0], dataset)


def test_group_answers_finds_most_common_wrong_answer():
    answers = ["1,080", None, "1079", r"\$1080", "1,079.00", "1079 dollars", "12"]
    groups = group_answers(answers, "gsm8k")
    assert groups == [[0, 3], [2, 4, 5], [6]]
    wrong = [g for g in groups if not is_equivalent(answers[g[0]], "1080", "gsm8k")]
    assert max(wrong, key=len) == [2, 4, 5]
    assert group_answers([r"\frac12", "0.5", r"\dfrac{2}{4}", "2"], "math500") == [[0, 1, 2], [3]]
    assert group_answers([None, None], "math500") == []


def test_group_answers_rules():
    assert group_answers(["1,000", "1000.0", "$1000"], "gsm8k") == [[0, 1, 2]]
    assert group_answers([r"\frac{1}{2}", "0.5"], "math500") == [[0, 1]]
    # groups in order of their first member, indices ascending, None in no group
    assert group_answers(["7", None, "5", "7.0", "5", "7"], "aime24") == [[0, 3, 5], [2, 4]]
    # the same string is always one group, even one is_equivalent cannot read as a gold
    assert not is_equivalent("#### 5", "#### 5", "gsm8k")
    assert group_answers(["#### 5", "#### 5"], "gsm8k") == [[0, 1]]
    # the first member is the gold: a factored answer joins an expanded one, not the reverse
    assert group_answers(["x^2+x-2", "(x-1)(x+2)"], "math500") == [[0, 1]]
    assert group_answers(["(x-1)(x+2)", "x^2+x-2"], "math500") == [[0], [1]]


def test_group_answers_as_the_callers_use_it():
    # SSB: the most common wrong answer, right answers masked to None; ties drawn by the caller
    answers = ["18", "1,000", "17", "1000.0", "18.00", "$1000", "17"]
    wrong = [None if is_equivalent(a, "18", "gsm8k") else a for a in answers]
    groups = group_answers(wrong, "gsm8k")
    assert groups == [[1, 3, 5], [2, 6]]
    top = max(map(len, groups))
    assert [g for g in groups if len(g) == top] == [[1, 3, 5]]
    # majority vote: no answer, no vote; a tie goes to the earliest group, its first sample
    votes = [None, "3", "4", "4.0", "3.0", None]
    groups = group_answers(votes, "gsm8k")
    assert groups == [[1, 4], [2, 3]]
    assert max(groups, key=len)[0] == 1


# ----------------------------------------------------------------------------- robustness

ADVERSARIAL = [
    "10^{10^{10}}",
    "10^{10^{10^{10}}}",
    "2^{2^{2^{2^{2^{2}}}}}",
    "9^{9^9}",
    "(10^{100000})^{100000}",
    "1000000!",
    "\\binom{100000000}{50000000}",
    "9" * 5000,
    "{" * 100_000,
    "}" * 100_000 + "{",
    "(" * 5000 + "1" + ")" * 5000,
    "\\frac{" * 300 + "1",
    "\\sqrt" * 400 + "2",
    "-" * 1000 + "1",
    "|" * 999 + "x" + "|" * 999,
    "x" + "^x" * 400,
    "1" + "!" * 500,
    "\\begin{pmatrix}" + "1 & " * 300 + "\\end{pmatrix}",
    ",".join(str(i) for i in range(300)),
    ",".join(f"\\sqrt{{{i}}}" for i in range(2, 150)),
    "\\{" + "\\pm 1," * 100 + "\\}",
    "x = y = z = 5",
    "\\log_0 0",
    "\\frac{1}{0}",
    "0^{-1}",
    "\\ln(0)",
    "\\tan(\\pi/2)",
    "(x+1)^{1000} - x^{1000}",
    "(x+y+z)^{100}",
    "\\sin(\\sin(\\sin(\\sin(\\sin(x)))))^{99}",
    "e^{e^{e^{e^{e^{e^{e}}}}}}",
    "\\boxed{\\boxed{\\boxed{",
    "\\text{" * 1000,
    "\\left( \\right] \\cup \\cup ,,, === \\pm\\pm",
    "\x00\uffff\U0001f600 \\u2212 \u2212 \u221e \u03c0",
    "a" * 1_000_000,
    "2\\begin{pmatrix}" + "1 \\\\ " * 300 + "\\end{pmatrix}",
    "(" + ",".join(f"x_{i}" for i in range(300)) + ") = (" + ",".join(map(str, range(300))) + ")",
    "x = " + " = ".join(["1+1"] * 300),
    "-" * 500 + "\\mathbf{I}",
    "5 \\geq " * 200 + "x",
]


@pytest.mark.parametrize("dataset", grader.DATASETS)
def test_adversarial_inputs_return_quietly(dataset):
    golds = ["18", "025", r"\frac{\sqrt{3}}{3}", "(x+1)^{1000}", "x^2+2x+1", "10^{10^{10}}"]
    for s in ADVERSARIAL:
        assert extract_answer(s, dataset) is None or isinstance(extract_answer(s, dataset), str)
        groups = group_answers([s, "18", s], dataset)
        assert groups[0][0] == 0 and 2 in groups[0]
        assert isinstance(grade("\\boxed{" + s + "}", s, dataset), bool)
        for g in golds:
            assert isinstance(is_equivalent(s, g, dataset), bool)
            assert isinstance(is_equivalent(g, s, dataset), bool)
    assert is_equivalent("10^{10^{10}}", "10^{10^{10}}", dataset)
    assert not is_equivalent("10^{10^{10}}", "10^{10^{10}}+1", "math500")


def test_adversarial_inputs_in_a_worker_thread():
    # No SIGALRM timer off the main thread: the static guards alone must bound the work.
    done = []

    def run():
        for s in ADVERSARIAL:
            for g in (r"\frac{\sqrt{3}}{3}", "(x+1)^{1000}", s):
                is_equivalent(s, g, "math500")
            group_answers([s, r"\frac{\sqrt{3}}{3}", s], "math500")
        done.append(True)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=120)
    assert done


LATEX_PIECES = list("0123456789+-*/^_{}()[],.=|!$%& xyzabcei") + [
    "\\frac", "\\dfrac", "\\sqrt", "\\boxed{", "\\fbox", "\\pi", "\\infty", "\\pm", "\\left(",
    "\\right)", "\\text{", "\\begin{pmatrix}", "\\end{pmatrix}", "\\\\", "\\cup", "\\{", "\\}",
    "10^{", "^{10}", "\\cdot", "\\sin", "\\log_", "\\circ", "\\%", "\\$", "\\!", ",\\!", "\\le",
    "#### ", "The answer is ", "\n", "99999999", "\\binom", "\\mbox{ cm}",
]
latex_soup = st.lists(st.sampled_from(LATEX_PIECES), max_size=40).map("".join)


@settings(max_examples=200, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(pred=st.one_of(latex_soup, st.text(max_size=80)), gold=latex_soup)
def test_fuzz_never_raises(pred, gold):
    for dataset in grader.DATASETS:
        extracted = extract_answer(pred, dataset)
        assert extracted is None or isinstance(extracted, str)
        assert isinstance(is_equivalent(pred, gold, dataset), bool)
        assert isinstance(grade(pred, gold, dataset), bool)
        groups = group_answers([pred, gold, pred], dataset)
        assert groups[0][0] == 0 and 2 in groups[0]
        # an answer is always equivalent to itself
        assert "####" in gold or is_equivalent(gold, gold, dataset)


# ----------------------------------------------------------------------------- real gold answers


def _math500():
    return [json.loads(line) for line in (DATA / "HuggingFaceH4__MATH-500" / "test.jsonl").open()]


def _parquet(rel):
    import pyarrow.parquet as pq

    return pq.read_table(DATA / rel).to_pylist()


def _cosmetic_variants(gold: str) -> list[str]:
    """Rewrites that keep the meaning of any MATH500 gold answer."""
    out = [
        f"${gold}$",
        f"  {gold} ",
        gold.replace("\\frac", "\\dfrac"),
        gold.replace("+", " + "),
        gold.replace("^\\circ", ""),
        re.sub(r"\\text\{\s*([^{}]*?)\s*\}", r" \1", gold),
        re.sub(r"(?<![\d\s])\\frac\{(\d+)\}\{(\d+)\}", r"\1/\2", gold),  # not 1\frac{4}{5}
        gold.replace("\\sqrt{", "\\sqrt {"),
    ]
    if not re.search(r"\d,(\\!)?\s*\d{3}", gold):  # a list, not a thousands separator
        out.append(gold.replace(",", ", "))
    if gold[:1] in "([" and gold[-1:] in ")]":
        out.append(f"\\left{gold[0]} {gold[1:-1]} \\right{gold[-1]}")
    if re.fullmatch(r"-?\d+", gold):
        out += [f"{gold}.0", f"{gold}.00"]
    return out


def _perturbed(gold: str) -> str:
    """A different answer: the last digit bumped, or a different word/letter/sign."""
    value = re.split(r"\\(?:mbox|text)\{", gold)[0]  # not a digit of a unit (cm^2)
    digits = [m.start() for m in re.finditer(r"\d", value)]
    if digits:
        i = digits[-1]
        return gold[:i] + str((int(gold[i]) + 1) % 10) + gold[i + 1 :]
    m = re.fullmatch(r"\\text\{\((\w)\)\}", gold)
    if m:
        return f"\\text{{({'A' if m.group(1) != 'A' else 'B'})}}"
    if gold.startswith("\\text{"):
        return "\\text{nobody}"
    return f"2({gold})"


@needs_data
def test_math500_solutions_grade_correct():
    rows = _math500()
    assert len(rows) == 500
    wrong = [r["unique_id"] for r in rows if not grade(r["solution"], r["answer"], "math500")]
    assert wrong == []


@needs_data
def test_math500_gold_variants_and_perturbations():
    failures = []
    for r in _math500():
        gold = r["answer"]
        if not grade(f"Therefore the answer is $\\boxed{{{gold}}}$.", gold, "math500"):
            failures.append(("boxed", gold))
        for v in _cosmetic_variants(gold):
            if not is_equivalent(v, gold, "math500"):
                failures.append(("variant", v, gold))
        bad = _perturbed(gold)
        if is_equivalent(bad, gold, "math500") or is_equivalent(gold, bad, "math500"):
            failures.append(("perturbed", bad, gold))
        if group_answers([gold, bad], "math500") != [[0], [1]]:
            failures.append(("group", bad, gold))
    assert failures == []


@needs_data
def test_math500_distinct_golds_are_not_equivalent():
    # Golds of different problems, compared by value: equal only when they are the same value,
    # whichever side is the gold, and then one group.
    rows = _math500()
    rng = random.Random(0)
    pairs = [(rng.choice(rows)["answer"], rng.choice(rows)["answer"]) for _ in range(400)]
    for a, b in pairs:
        same = is_equivalent(a, b, "math500")
        assert same == is_equivalent(b, a, "math500") == (a == b), (a, b)
        assert (len(group_answers([a, b], "math500")) == 1) == same, (a, b)


@needs_data
def test_aime_golds():
    rows = _parquet("HuggingFaceH4__aime_2024/data/train-00000-of-00001.parquet")
    assert len(rows) == 30
    for r in rows:
        gold = r["answer"]
        n = int(gold)
        for v in (str(n), gold, f"{n}.0", f"$\\boxed{{{n}}}$"):
            assert is_equivalent(v, gold, "aime24"), (v, gold)
        assert grade(f"so the answer is $\\boxed{{{gold}}}$", gold, "aime24")
        for bad in (str(n + 1), str(n * 10), f"{n}.5"):
            assert not is_equivalent(bad, gold, "aime24"), (bad, gold)


@needs_data
@pytest.mark.parametrize("split", ["train", "test"])
def test_gsm8k_golds(split):
    rows = _parquet(f"openai__gsm8k/main/{split}-00000-of-00001.parquet")
    assert len(rows) == {"train": 7473, "test": 1319}[split]
    for r in rows[:: 4 if split == "train" else 1]:
        gold = r["answer"].split("####")[-1].strip()
        n = int(gold.replace(",", ""))
        variants = [gold, str(n), f"{n:,}", f"\\${n}", f"{n}.00", f"{n} dollars", f"\\text{{{n}}}"]
        for v in variants:
            assert grade(f"... so the total is \\boxed{{{v}}}.", gold, "gsm8k"), (v, gold)
        assert grade(r["answer"], gold, "gsm8k")  # the reference solution itself (#### line)
        for bad in (str(n + 1), str(-n) if n else "1", f"{n}.5"):
            assert not is_equivalent(bad, gold, "gsm8k"), (bad, gold)
        assert group_answers([gold, f"{n:,}", f"{n}.00"], "gsm8k") == [[0, 1, 2]]
