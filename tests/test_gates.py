"""Quality gates on hand-written teacher solutions: each gate fires on its case and only there."""

import pytest

from minissb import gates, prompts
from minissb.gates import check_solution, copied_fraction, find_leaks

QUESTION = (
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
    "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 "
    "per fresh duck egg. How much in dollars does she make every day at the farmers' market?"
)
CORRECT = (
    "Janet's ducks lay 16 eggs each day. She uses 3 for breakfast and 4 for muffins, which is 3 + 4 = 7 "
    "eggs in all. That leaves 16 - 7 = 9 eggs to sell. Each egg sells for $2, so she earns 9 * 2 = 18 "
    "dollars a day.\n\nThe final answer is \\boxed{18}."
)
WRONG = (
    "The ducks lay 16 eggs. Janet eats 3 of them, so 16 - 3 = 13 remain. She sells them at $2 each, "
    "making 13 * 2 = 26 dollars every day at the market.\n\nSo the answer is \\boxed{26}."
)
CLEAN = (
    "First count the eggs that are not sold. Breakfast takes 3 eggs and baking takes 4 eggs, so 7 eggs "
    "are used at home. Be careful to subtract both uses, not only breakfast, before selling.\n"
    "Eggs left for the market: 16 - 7 = 9.\n"
    "Money from the market: 9 eggs x $2 per egg = $18.\n\n"
    "The final answer is \\boxed{18}."
)


def references(chat=None):
    chat = chat or prompts.teacher_chat(QUESTION, CORRECT, WRONG)
    return {"correct": CORRECT, "wrong": WRONG, "prompt": chat[-1]["content"]}


def test_clean_standalone_solution_passes():
    result = check_solution(CLEAN, "stop", QUESTION, references())
    assert result.passed, result.to_dict()
    assert result.leaks == []
    assert max(result.copy.values()) < 0.2


def test_truncated_solution_is_rejected():
    result = check_solution(CLEAN[:120], "length", QUESTION, references())
    assert result.fired == ["truncated"]


def test_copy_of_the_hinted_prompt_is_rejected_as_leak_and_copy():
    chat = prompts.teacher_chat(QUESTION, CORRECT, WRONG)
    echoed = chat[-1]["content"]  # the model repeats its prompt, labels and both attempts
    result = check_solution(echoed, "length", QUESTION, references(chat))
    assert result.fired == ["truncated", "leak", "copy"]
    assert any(leak.startswith("section label") for leak in result.leaks)
    assert result.copy["prompt"] == 1.0


@pytest.mark.parametrize("which", ["correct", "wrong"])
def test_copied_rollout_is_rejected(which):
    source = CORRECT if which == "correct" else WRONG
    # a light rewrite: a new first sentence, the rest word for word
    copied = "Let us solve this carefully.\n" + source
    result = check_solution(copied, "stop", QUESTION, references())
    assert result.fired == ["copy"], result.to_dict()
    assert result.copy[which] > 0.8


@pytest.mark.parametrize(
    "sentence, pattern",
    [
        ("Response 1 is correct: 16 - 7 = 9 eggs remain.", "response"),
        ("The second attempt forgot the muffins.", "attempt"),
        ("Unlike the flawed attempts, we subtract both uses.", "attempt"),
        ("The student only subtracted the breakfast eggs.", "student"),
        ("As the grader noted, 26 is not right.", "grader"),
        ("Using the hint, we subtract 7 eggs.", "hint"),
        ("### Attempt that reaches a wrong answer\nThe ducks lay 16 eggs.", "section label"),
        ("attempt that reaches the right answer: 18", "section label"),
        ("Problem:\nJanet's ducks lay 16 eggs per day.", "section label"),
        ("Right final answer: 18", "section label"),
        ("Now write your own solution to this problem.", "section label"),
        ("The previous solution made an error when it ignored the muffins.", "earlier solution"),
        ("The given answer of 26 is wrong because the muffins were ignored.", "earlier solution"),
        ("Solution 2 subtracts only 3 eggs.", "numbered solution"),
        ("I was shown two ways to do this; here is mine.", "shown"),
        ("As the prompt says, the answer is 18.", "prompt"),
        ("第二个尝试忘记了松饼。", "chinese"),
    ],
)
def test_leaks_in_different_phrasings(sentence, pattern):
    solution = f"{sentence}\n{CLEAN}"
    leaks = find_leaks(solution, QUESTION)
    assert any(leak.startswith(pattern + ":") for leak in leaks), leaks
    assert check_solution(solution, "stop", QUESTION, references()).fired == ["leak"]


@pytest.mark.parametrize(
    "sentence",
    [
        "We are given that the ducks lay 16 eggs per day.",
        "We attempt to count the eggs that are left.",
        "A common mistake is to forget the muffins: subtract both uses.",
        "The correct answer must be a whole number of dollars.",
        "The final answer comes from the eggs that remain.",
        "So the right final answer is 18.",
        "### Problem Analysis",
        "Check the result: 9 + 7 = 16, as expected.",
    ],
)
def test_ordinary_math_phrasing_is_not_a_leak(sentence):
    assert find_leaks(f"{sentence}\n{CLEAN}", QUESTION) == []


def test_leak_words_that_the_problem_itself_uses_are_allowed():
    question = "A class has 30 students. A third of the students got a hint from the teacher. How many students got no hint?"
    solution = "A third of 30 students is 30 / 3 = 10 students with a hint. So 30 - 10 = 20 students got no hint. \\boxed{20}"
    assert find_leaks(solution, question) == []
    # ...but a word the problem does not use still counts
    assert find_leaks("Response 1 is right. " + solution, question) == ["response: Response"]


def test_overlap_measure_on_known_strings():
    ref = "a b c d e f g h i j"
    assert copied_fraction("a b c d e f g h i j", ref, n=8) == 1.0  # 3 of 3 8-grams
    assert copied_fraction("a b c d e f g h x y", ref, n=8) == pytest.approx(1 / 3)  # only "a..h" is shared
    assert copied_fraction("z a b c d e f g h", ref, n=8) == pytest.approx(1 / 2)
    assert copied_fraction("short text", ref, n=8) == 0.0  # no 8-gram at all
    # punctuation counts as words; case does not matter
    assert gates.words("Eggs: 16-7=9.") == ["eggs", ":", "16", "-", "7", "=", "9", "."]
    assert copied_fraction("A B C D E F G H", "a b c d e f g h", n=8) == 1.0
    # n-grams that are also in the question are not counted
    assert copied_fraction("a b c d e f g h i", ref, exclude="a b c d e f g h", n=8) == 1.0  # "b..i" left, copied
    assert copied_fraction("a b c d e f g h", ref, exclude="a b c d e f g h", n=8) == 0.0
    # the default n-gram length
    text = " ".join(f"w{i}" for i in range(gates.COPY_NGRAM + 1))
    assert copied_fraction(text, text) == 1.0 and copied_fraction(text, text.rsplit(" ", 1)[0]) == 0.5


def test_sharing_the_problem_numbers_and_final_answer_is_not_a_copy():
    # Both restate the problem and end with the same final sentence: that alone is not copying.
    restated = "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her friends every day with four."
    solution = (
        f"{restated}\nShe uses 3 + 4 = 7 eggs, so she sells 16 - 7 = 9 eggs.\n"
        "She makes 9 x 2 = 18 dollars per day at the farmers' market.\n\nThe final answer is \\boxed{18}."
    )
    rollout = (
        f"{restated}\nAltogether 7 eggs are used, leaving 9 eggs for sale.\n"
        "At $2 each that is $18.\n\nThe final answer is \\boxed{18}."
    )
    result = check_solution(solution, "stop", QUESTION, {"correct": rollout, "wrong": WRONG, "prompt": rollout + WRONG})
    assert result.passed, result.to_dict()
