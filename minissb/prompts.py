"""Every prompt minissb sends to a model, in one place.

The student sees the system prompt and the bare question, at sampling, training and evaluation
alike: training on one prompt format and testing on another would measure the format, not the
method. Only the teacher sees the hinted prompt with the two earlier attempts.

Our prompts are below. Another set (e.g. the original SSB code's, which are its authors' words
and not ours to ship: README, "minissb vs the original") comes from files: a system prompt, and
a teacher prompt with the placeholders {question}, {correct}, {wrong} and optionally {gold}.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SYSTEM_PROMPT = (
    "You are a patient math tutor. Solve the problem step by step, explaining the reasoning "
    "behind each step in detail. Write the final answer at the end, inside \\boxed{}."
)

# The hinted prompt shows the teacher one attempt that reached the right answer and one that
# reached the most common wrong answer. It must produce a solution that reads as if written
# from scratch: the student is trained on it while seeing only the question.
#
# Layout, chosen on Qwen2.5-Coder-1.5B-Instruct (README, "Quality gates"): instructions first,
# plain "Label:" lines, and the chat ends on the problem itself, so that the natural
# continuation is a solution. With markdown "### Problem" / "### Attempt ..." headings and the
# instructions last, 8 of 8 teacher outputs continued the template (a new "### Problem" with
# invented attempts) instead of solving; with this layout 7 of 8 reached the right answer.
TEACHER_INSTRUCTIONS = (
    "Below is a math problem and two earlier attempts at it. One attempt reaches the right final "
    "answer; the other makes a mistake and reaches a wrong one.\n\n"
    "Write your own complete solution to the problem. Work step by step and explain each step "
    "clearly. At the point where the mistaken attempt went wrong, take extra care and briefly "
    "point out the pitfall to avoid, phrased as general advice about the problem. Your solution "
    "must stand on its own: do not mention, quote or compare with the attempts, and do not say "
    "that you were shown anything. End with the final answer inside \\boxed{}."
)

# Section labels of the hinted prompt. The quality gates also look for them in teacher
# solutions: a solution that repeats them is leaking the hint.
LABEL_PROBLEM = "Problem:"
LABEL_CORRECT = "Attempt that reaches the right answer:"
LABEL_WRONG = "Attempt that reaches a wrong answer:"
LABEL_GOLD = "Right final answer:"
LABEL_TASK = "Now write your own solution to this problem, without mentioning the attempts:"


def student_chat(question: str, system: str | None = None) -> list[dict]:
    """The chat a student (and any evaluated model) sees: system prompt + bare question.
    system: another system prompt (e.g. one read with --system-prompt-file); None = ours."""
    return [{"role": "system", "content": SYSTEM_PROMPT if system is None else system}, {"role": "user", "content": question.strip()}]


# ----------------------------------------------------------------------------- prompt files

# A teacher prompt file is the whole user turn, with these named placeholders filled in; any
# other text, braces included (\boxed{}), is kept as written.
PLACEHOLDERS = ("question", "correct", "wrong", "gold")
REQUIRED_PLACEHOLDERS = ("question", "correct", "wrong")
_PLACEHOLDER_RE = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")


def read_prompt_file(path: str | os.PathLike, teacher: bool) -> str:
    """The text of a --system-prompt-file or --teacher-prompt-file, checked."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the prompt file ({e.__class__.__name__}: {e})") from None
    if not text.strip():
        raise ValueError(f"{path}: the prompt file is empty")
    if teacher:
        missing = [p for p in REQUIRED_PLACEHOLDERS if "{" + p + "}" not in text]
        if missing:
            raise ValueError(f"{path}: the teacher prompt has no {{{missing[0]}}} placeholder "
                                  f"(it needs {{question}}, {{correct}} and {{wrong}}; {{gold}} is optional)")
    return text


def fill_template(template: str, **values: str) -> str:
    """Replace {question}, {correct}, {wrong}, {gold} in one pass (a value's own braces stay as they are)."""
    return _PLACEHOLDER_RE.sub(lambda m: values.get(m.group(1)) or "", template)


def teacher_chat(
    question: str,
    correct_response: str,
    wrong_response: str,
    *,
    wrong_first: bool = False,
    gold: str | None = None,
    system: str | None = None,
    template: str | None = None,
) -> list[dict]:
    """The hinted chat the teacher answers.

    The paper shows the correct response first; `wrong_first` swaps the two. `gold`, when given,
    also states the right final answer. template: a prompt file's text instead of our layout,
    filled as written (its order of sections is its own; wrong_first does not apply).
    """
    system = SYSTEM_PROMPT if system is None else system
    if template is not None:
        user = fill_template(template, question=question.strip(), correct=correct_response, wrong=wrong_response, gold=gold)
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]
    question = question.strip()
    correct = f"{LABEL_CORRECT}\n{correct_response.strip()}"
    wrong = f"{LABEL_WRONG}\n{wrong_response.strip()}"
    attempts = [wrong, correct] if wrong_first else [correct, wrong]
    parts = [TEACHER_INSTRUCTIONS, f"{LABEL_PROBLEM}\n{question}", *attempts]
    if gold is not None:
        parts.append(f"{LABEL_GOLD} {gold}")
    parts.append(f"{LABEL_TASK}\n{question}")
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]
