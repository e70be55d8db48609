"""Quality gates for teacher solutions: reject the ones a student must not be trained on.

A teacher solution that reached the right answer can still be useless as a distillation
target. On a small Qwen2.5 most "correct" teacher outputs were one of these:

- truncated: generation stopped at the token limit, not at <|im_end|>. The student would be
  trained to ramble and never stop.
- leak: the solution talks about what the teacher was shown ("Response 1 is wrong because",
  "the student forgot", "### Attempt that reaches ..."). The student sees only the question,
  so it would learn to refer to things that are not there.
- copy: the solution reproduces a long stretch of one of the given attempts, or of the
  hinted prompt. A copied wrong attempt teaches the mistake; a copied correct one adds
  nothing the rollout did not already have.

Each gate is a plain function so it can be tested on hand-written strings; `check_solution`
runs all of them and reports every gate that fired (the first one is the skip reason).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from minissb import prompts

GATES = ("truncated", "leak", "copy")

# ----------------------------------------------------------------------------- leak

# The labels of the hinted prompt, without markdown "#" or the colon. Long ones are distinctive
# anywhere ("Attempt that reaches a wrong answer"); short ones ("Problem", "Right final answer")
# count only as a label starting a line ("Problem:") or as a heading ("### Problem").
_LABELS = [label.strip("#: ") for label in (
    prompts.LABEL_PROBLEM, prompts.LABEL_CORRECT, prompts.LABEL_WRONG, prompts.LABEL_GOLD, prompts.LABEL_TASK
)]
_LONG_LABELS = [label for label in _LABELS if len(label.split()) >= 4]
_SHORT_LABELS = [label for label in _LABELS if len(label.split()) < 4]

# Each pattern names one way a solution can refer to the hidden context. They are matched
# case-insensitively. Math solutions say "we are given", "the correct answer", "a common
# mistake is": none of those match. A pattern that also matches the question itself (a
# problem about students, hints or survey responses) is ignored for that problem.
LEAK_PATTERNS: dict[str, str] = {
    "section label": "|".join(
        [re.escape(label.split(",")[0]) for label in _LONG_LABELS]  # the first clause is enough
        + [rf"^[ \t]*(?:#+[ \t]*)?{re.escape(label)}[ \t]*:|^[ \t]*#+[ \t]*{re.escape(label)}[ \t]*$" for label in _SHORT_LABELS]
    ),
    # "attempt" the noun; "we attempt to" is a verb and harmless.
    "attempt": r"\battempts?\b(?!\s+to\b)",
    "response": r"\bresponses?\b",
    "submission": r"\bsubmissions?\b|\bcandidate (?:solutions?|answers?)\b|\brollouts?\b",
    "student": r"\bstudents?\b|\bpupils?\b|\blearners?\b",
    "grader": r"\bgrad(?:er|ers|ed)\b|\bmarked (?:as )?(?:wrong|incorrect|correct)\b",
    "hint": r"\bhint(?:s|ed)?\b",
    "prompt": r"\bprompt\b|\bthe (?:model|assistant)\b",
    # A specific earlier solution: "the first solution", "the previous answer", "the given approach".
    "earlier solution": r"\b(?:first|second|other|previous|earlier|given|provided|original|reference) "
    r"(?:solutions?|answers?|approach(?:es)?)\b",
    "numbered solution": r"\b(?:solution|answer|option|version)\s*#?\s*[12]\b",
    "shown": r"\b(?:you|i) (?:were|was|have been|am|are) (?:shown|given|provided)\b",
    # Qwen models sometimes switch to Chinese: student, attempt, response/answer, hint.
    "chinese": r"学生|尝试|回答|提示",
}
_LEAK_RES = {name: re.compile(p, re.IGNORECASE | re.MULTILINE) for name, p in LEAK_PATTERNS.items()}


def find_leaks(solution: str, question: str = "") -> list[str]:
    """The phrases of `solution` that refer to the hidden context, as "pattern: matched text".

    Patterns that match `question` too are skipped: the problem itself may be about students.
    """
    found = []
    for name, rx in _LEAK_RES.items():
        if question and rx.search(question):
            continue
        m = rx.search(solution)
        if m:
            found.append(f"{name}: {m.group(0).strip()}")
    return found


# ----------------------------------------------------------------------------- copy

# The copy measure: the share of the solution's 12-grams (in words and punctuation marks, not
# counting 12-grams of the question) that also occur in one reference text. Measured on
# Qwen2.5-Coder-1.5B-Instruct (bf16, GSM8K train): two independent rollouts of one problem
# (T=0.8) share at most 0.37 of their 12-grams (p99 0.36, 192 pairs); a teacher solution
# that echoed the prompt shared 0.71 with the correct attempt, and straight copies 0.65-1.0.
# With 8-grams independent rollouts already reach 0.52: one model reuses its own phrases, so
# short n-grams mislead. The whole prompt holds both attempts: against the union of two other
# rollouts an independent one shares up to 0.50 (p99 0.39), so a solution pieced together
# from both attempts is caught there, at the price of rare false rejections near the edge.
COPY_NGRAM = 12
COPY_THRESHOLD = 0.5

_WORD_RE = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lowercased words, numbers and single punctuation marks: what overlap is counted in."""
    return _WORD_RE.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def copied_fraction(solution: str, reference: str, exclude: str = "", n: int = COPY_NGRAM) -> float:
    """Share of the solution's word n-grams found in `reference`, not counting n-grams of `exclude`.

    `exclude` is the question: restating the problem is normal and must not count as copying.
    0.0 when the solution has no n-gram outside `exclude`.
    """
    own = ngrams(words(solution), n) - ngrams(words(exclude), n)
    if not own:
        return 0.0
    return len(own & ngrams(words(reference), n)) / len(own)


# ----------------------------------------------------------------------------- all gates


@dataclass
class GateResult:
    fired: list[str]  # gate names in GATES order; empty = the solution passes
    leaks: list[str] = field(default_factory=list)
    copy: dict[str, float] = field(default_factory=dict)  # reference name -> copied fraction

    @property
    def passed(self) -> bool:
        return not self.fired

    def to_dict(self) -> dict:
        return {"fired": self.fired, "leaks": self.leaks, "copy": self.copy}


def check_solution(
    solution: str,
    finish_reason: str,
    question: str,
    references: dict[str, str],
    copy_threshold: float = COPY_THRESHOLD,
) -> GateResult:
    """Run every gate on one teacher solution.

    references: the texts the teacher saw and must not copy, by name, e.g. {"correct": rollout,
    "wrong": rollout, "prompt": the hinted user message}.
    """
    fired = []
    if finish_reason != "stop":
        fired.append("truncated")
    leaks = find_leaks(solution, question)
    if leaks:
        fired.append("leak")
    copy = {name: round(copied_fraction(solution, ref, exclude=question), 4) for name, ref in references.items()}
    if any(f > copy_threshold for f in copy.values()):
        fired.append("copy")
    return GateResult(fired=fired, leaks=leaks, copy=copy)


__all__ = [
    "GATES",
    "LEAK_PATTERNS",
    "COPY_NGRAM",
    "COPY_THRESHOLD",
    "GateResult",
    "check_solution",
    "find_leaks",
    "copied_fraction",
    "words",
]
