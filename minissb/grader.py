"""Answer checking for GSM8K, MATH500 and AIME 2024: extract, compare, group.

Every SSB stage turns on this module: which rollouts are right, which wrong answer is the
most common one, whether the teacher's solution is still right, and the accuracy tables.

Read top to bottom:
  extract  the content of the last \\boxed{...}, else a per-dataset answer phrase
  clean    string-level LaTeX cosmetics: $, \\left, \\dfrac, units, degrees, \\%, \\!
  parse    a small recursive-descent LaTeX parser into a tuple AST (no eval, no sympy)
  compare  structure first (tuple / interval / set / matrix / list / equation), then each
           element: exact rationals in plain Python; anything else must agree to 30 digits
           at three fixed points (mpmath), and then sympy, under a time limit, has the
           last word (it proves the identity or refutes it) where it can run
  group    answer_key (canonical string) and group_answers (equivalence-aware)

Bounded time on any input: extraction is linear and reads only the tail for fallbacks;
answers longer than MAX_ANSWER_CHARS or nested deeper than MAX_DEPTH are compared as
strings; powers and factorials are size-checked before any arithmetic; sympy runs only
under a SIGALRM timer, which exists only in the main thread. Elsewhere (a worker thread,
or a caller already using SIGALRM) the numeric identity test decides alone.
"""

from __future__ import annotations

import math
import re
import signal
import threading
import time
from fractions import Fraction
from functools import lru_cache

DATASETS = ("gsm8k", "math500", "aime24")
MAX_ANSWER_CHARS = 1000  # longer "answers" are garbage: compared as strings, never parsed
MAX_DEPTH = 40  # bracket nesting allowed before parsing (the parser is recursive)
MAX_DIGITS = 200  # longest number literal the parser accepts
TAIL_CHARS = 2000  # fallback phrases are searched in the response's last characters only
SYMPY_SECONDS = 1.0  # sympy time allowed per is_equivalent call (all its proofs together)
MAX_EXACT_BITS = 100_000  # exact powers/factorials larger than this are not computed


class GraderError(ValueError):
    """Bad argument to the grader (an unknown dataset name)."""


class _ParseError(Exception):
    pass


class _EvalError(Exception):
    pass


class _Timeout(BaseException):
    # BaseException so that sympy's internal `except Exception` blocks cannot swallow it.
    pass


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise GraderError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------- extraction

_BRACE_RE = re.compile(r"\\.|[{}]", re.S)  # escaped chars (\{ \}) do not open or close groups
_HASH_RE = re.compile(r"####[ \t]*([^\n]+)")
_PHRASE_RE = re.compile(r"(?:final answer|the answer)(?:\s+is|\s*[:=])?[\s*:]*([^\n]+)", re.I)
_MATH_SPAN_RE = re.compile(r"\$+([^$]+)\$+|\\\((.+?)\\\)|\\\[(.+?)\\\]")


def _last_boxed(text: str) -> tuple[bool, str | None]:
    """(found, content) of the last \\boxed / \\fbox; content None when it was cut off."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return False, None
    j = i + (6 if text.startswith("\\boxed", i) else 5)
    while j < len(text) and text[j].isspace() and j < i + 100:
        j += 1
    if j < len(text) and text[j] == "{":
        depth = 0
        for m in _BRACE_RE.finditer(text, j):
            if m.group() == "{":
                depth += 1
            elif m.group() == "}":
                depth -= 1
                if depth == 0:
                    return True, text[j + 1 : m.start()].strip()
        return True, None  # unbalanced: the output stopped inside the box
    m = re.match(r"[^\s$]+", text[j : j + 200])  # `\boxed 5`
    return True, (m.group().rstrip(".,;") if m else None)


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
    s = s.strip().rstrip(".,;").strip()
    return s or None


def extract_answer(text: str, dataset: str, *, fallback: bool = True) -> str | None:
    """The final answer written in a model response, or None when there is none.

    The content of the LAST \\boxed{...} (also \\fbox{...} and `\\boxed 5`), nested braces
    allowed. A box that never closes means the response was cut off: None. Without a box,
    and with fallback=True, the last answer phrase in the response's tail: "#### X"
    (gsm8k only), "The answer is X", "Final answer: X" (first $...$ span of that line if
    any). A bare trailing number is NOT taken: in a truncated rollout it is an
    intermediate value, and counting it would mark unfinished work as correct.
    """
    _check_dataset(dataset)
    if not isinstance(text, str):
        return None
    found, content = _last_boxed(text)
    if found:
        return content or None
    if not fallback:
        return None
    tail = text[-TAIL_CHARS:]
    if dataset == "gsm8k":
        hits = _HASH_RE.findall(tail)
        if hits:
            return _phrase_answer(hits[-1])
    hits = _PHRASE_RE.findall(tail)
    return _phrase_answer(hits[-1]) if hits else None


# ----------------------------------------------------------------------------- cleaning

_UNICODE = {
    "\u2212": "-", "\u2013": "-", "\u00d7": "\\times ", "\u00f7": "\\div ", "\u00b7": "\\cdot ",
    "\u03c0": "\\pi ", "\u221e": "\\infty ", "\u221a": "\\sqrt", "\u2264": "\\leq ",
    "\u2265": "\\geq ", "\u00b0": "", "\u00a0": " ", "\u222a": "\\cup ",
}
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
        depth, end = 0, None
        for b in _BRACE_RE.finditer(s, m.end() - 1):
            depth += {"{": 1, "}": -1}.get(b.group(), 0)
            if depth == 0:
                end = b.start()
                break
        if end is None:  # unbalanced: drop the command name only
            s = s[: m.start()] + s[m.end() - 1 :]
            continue
        body = s[m.end() : end]
        pad = " " if re.fullmatch(_TEXT_CMDS, m.group(1)) else ""
        s = s[: m.start()] + pad + body + pad + s[end + 1 :]
    return s


def _clean(s: str) -> str:
    for k, v in _UNICODE.items():
        if k in s:
            s = s.replace(k, v)
    s = _unwrap(s)
    s = _REPEATING_RE.sub(_repeating_decimal, s)  # 1.\overline{3}
    for pattern, repl in _CLEAN_SUBS:
        s = pattern.sub(repl, s)
    s = _UNIT_TAIL_RE.sub("", s)
    s = s.strip().rstrip(".").strip()
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):  # 58,500 (a whole-answer number)
        s = s.replace(",", "")
    return s


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


def _max_depth(s: str) -> int:
    depth = best = 0
    for c in s:
        if c in "([{":
            depth += 1
            best = max(best, depth)
        elif c in ")]}":
            depth -= 1
    return best


def _split_top(s: str, sep: str) -> list[str]:
    """Split on `sep` outside any (), [] or {} (intervals like (3,4] count as balanced)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _wraps_whole(s: str, start: int) -> bool:
    """True when the bracket at s[start] closes exactly at the last character."""
    depth = 0
    for i in range(start, len(s)):
        if s[i] in "([{":
            depth += 1
        elif s[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i == len(s) - 1
    return False


# ----------------------------------------------------------------------------- parsing
# AST nodes are tuples: ("num", Fraction) ("sym", name) ("pi",) ("E",) ("I",) ("oo",)
# ("neg", x) ("add", xs) ("mul", xs) ("pow", base, exp) ("fn", name, x) ("fact", x)
# ("binom", n, k) ("abs", x). a/b is ("mul", (a, ("pow", b, -1))).

_TOKEN_RE = re.compile(r"\s*(?:(\\[a-zA-Z]+|\\[{}|])|(\d+(?:\.\d*)?|\.\d+)|([a-zA-Z])|(\S))")
_FUNCS = {
    "sin": "sin", "cos": "cos", "tan": "tan", "cot": "cot", "sec": "sec", "csc": "csc",
    "arcsin": "asin", "arccos": "acos", "arctan": "atan", "sinh": "sinh", "cosh": "cosh",
    "tanh": "tanh", "log": "log", "ln": "log", "exp": "exp",
}
_GREEK = set(
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu "
    "xi rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Sigma Phi Omega".split()
)
_MUL_OPS = ("*", "\\cdot", "\\times", "\\ast")
_DIV_OPS = ("/", "\\div")
_MINUS_ONE = ("num", Fraction(-1))
_HALF = ("num", Fraction(1, 2))


class _Parser:
    def __init__(self, s: str):
        self.toks: list[str] = []
        pos = 0
        while pos < len(s):
            m = _TOKEN_RE.match(s, pos)
            if not m:
                break  # only trailing whitespace is left
            self.toks.append(m.group(m.lastindex))
            pos = m.end()
        self.i = 0
        self.depth = 0
        self.in_abs = 0

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> str:
        if self.i >= len(self.toks):
            raise _ParseError("unexpected end")
        self.i += 1
        return self.toks[self.i - 1]

    def expect(self, tok: str) -> None:
        if self.take() != tok:
            raise _ParseError(f"expected {tok}")

    def parse(self):
        node = self.expr()
        if self.i != len(self.toks):
            raise _ParseError(f"unexpected {self.peek()!r}")
        return node

    def expr(self):
        self.depth += 1
        if self.depth > 2 * MAX_DEPTH:
            raise _ParseError("too deep")
        terms = [self.term()]
        while self.peek() in ("+", "-"):
            op = self.take()
            t = self.term()
            terms.append(t if op == "+" else ("neg", t))
        self.depth -= 1
        return terms[0] if len(terms) == 1 else ("add", tuple(terms))

    def term(self):
        factors = [self.unary()]
        while True:
            t = self.peek()
            if t in _MUL_OPS:
                self.take()
                factors.append(self.unary())
            elif t in _DIV_OPS:
                self.take()
                factors.append(("pow", self.unary(), _MINUS_ONE))
            elif self.starts_atom(t):  # implicit product: 2\pi, 3\sqrt{13}, (a+5)(b+2)
                factors.append(self.power())
            else:
                break
        return factors[0] if len(factors) == 1 else ("mul", tuple(factors))

    def unary(self):
        if self.peek() in ("-", "+"):
            self.depth += 1
            if self.depth > 2 * MAX_DEPTH:
                raise _ParseError("too deep")
            sign = self.take()
            x = self.unary()
            self.depth -= 1
            return ("neg", x) if sign == "-" else x
        return self.power()

    def power(self):
        base = self.postfix()
        if self.peek() == "^":
            self.take()
            return ("pow", base, self.exponent())
        return base

    def exponent(self):
        if self.peek() == "{":
            return self.group()
        if self.peek() in ("-", "+"):
            sign = self.take()
            x = self.postfix()
            return ("neg", x) if sign == "-" else x
        return self.postfix()

    def postfix(self):
        # \sqrt\sqrt\sqrt... nests without brackets: count depth here too.
        self.depth += 1
        if self.depth > 4 * MAX_DEPTH:
            raise _ParseError("too deep")
        x = self.atom()
        if self.peek() == "!":
            self.take()
            x = ("fact", x)
        self.depth -= 1
        return x

    def starts_atom(self, t: str | None) -> bool:
        if t is None:
            return False
        if t in ("(", "{", "\\frac", "\\sqrt", "\\binom", "\\pi", "\\infty"):
            return True
        if t == "|":
            return not self.in_abs
        if t[0] == "\\":
            return t[1:] in _FUNCS or t[1:] in _GREEK
        return t[0].isdigit() or t[0] == "." and len(t) > 1 or t.isalpha()

    def group(self):
        self.expect("{")
        x = self.expr()
        self.expect("}")
        return x

    def arg(self):
        return self.group() if self.peek() == "{" else self.postfix()

    def atom(self):
        t = self.take()
        if t[0].isdigit() or (t[0] == "." and len(t) > 1):
            if len(t) > MAX_DIGITS:
                raise _ParseError("number too long")
            return ("num", Fraction(t.rstrip(".") or "0"))
        if len(t) == 1 and t.isalpha():
            if self.peek() == "_":  # x_1, a_{n}
                self.take()
                sub = self.take()
                if sub == "{":
                    parts = []
                    while self.peek() not in ("}", None):
                        parts.append(self.take())
                    self.expect("}")
                    sub = "".join(parts)
                return ("sym", f"{t}_{sub}")
            return {"i": ("I",), "e": ("E",)}.get(t, ("sym", t))
        if t == "(":
            x = self.expr()
            self.expect(")")
            return x
        if t == "{":
            x = self.expr()
            self.expect("}")
            return x
        if t == "|":
            self.in_abs += 1
            x = self.expr()
            self.expect("|")
            self.in_abs -= 1
            return ("abs", x)
        if t == "\\frac":
            num, den = self.arg(), self.arg()
            return ("mul", (num, ("pow", den, _MINUS_ONE)))
        if t == "\\sqrt":
            if self.peek() == "[":
                self.take()
                index = self.expr()
                self.expect("]")
                return ("pow", self.arg(), ("pow", index, _MINUS_ONE))
            return ("pow", self.arg(), _HALF)
        if t == "\\binom":
            return ("binom", self.arg(), self.arg())
        if t == "\\pi":
            return ("pi",)
        if t == "\\infty":
            return ("oo",)
        if t[0] == "\\" and t[1:] in _GREEK:
            return ("sym", t[1:])
        if t[0] == "\\" and t[1:] in _FUNCS:
            return self.function(_FUNCS[t[1:]])
        raise _ParseError(f"unexpected {t!r}")

    def function(self, name: str):
        base = power = None
        if name == "log" and self.peek() == "_":
            self.take()
            base = self.arg()
        if self.peek() == "^":  # \sin^2 x
            self.take()
            power = self.exponent()
        if self.peek() == "(":
            self.take()
            x = self.expr()
            self.expect(")")
        else:  # \cot x, \sin 2x: the following run of numbers and letters
            factors = [self.power()]
            while self.peek() is not None and (self.peek()[0].isalnum()):
                factors.append(self.power())
            x = factors[0] if len(factors) == 1 else ("mul", tuple(factors))
        node = ("fn", name, x)
        if base is not None:
            node = ("mul", (node, ("pow", ("fn", "log", base), _MINUS_ONE)))
        return node if power is None else ("pow", node, power)


def _parse_expr(s: str):
    """AST of one LaTeX expression, or None when it is not one we understand."""
    s = s.strip()
    if not s or len(s) > MAX_ANSWER_CHARS or _max_depth(s) > MAX_DEPTH:
        return None
    try:
        return _Parser(s).parse()
    except (_ParseError, ValueError, ZeroDivisionError, RecursionError):
        return None


# ----------------------------------------------------------------------------- evaluation


def _exact_root(q: Fraction, n: int) -> Fraction | None:
    if q < 0:
        if n % 2 == 0:
            return None
        r = _exact_root(-q, n)
        return None if r is None else -r
    out = []
    for v in (q.numerator, q.denominator):
        if n == 2:
            r = math.isqrt(v)
        elif v.bit_length() <= 150:  # the float root is within 1 of the integer root
            r = round(v ** (1.0 / n))
        else:
            return None
        r = next((c for c in (r - 1, r, r + 1) if c >= 0 and c**n == v), None)
        if r is None:
            return None
        out.append(r)
    return Fraction(out[0], out[1])


def _pow_fits(base: Fraction, n: int) -> bool:
    bits = base.numerator.bit_length() + base.denominator.bit_length()
    return abs(n) <= 10_000 and bits * abs(n) <= MAX_EXACT_BITS


@lru_cache(maxsize=16384)
def _exact(node) -> Fraction | None:
    """Exact rational value of an AST with no symbols or irrationals, else None."""
    tag = node[0]
    if tag == "num":
        return node[1]
    if tag in ("neg", "abs"):
        v = _exact(node[1])
        return None if v is None else (-v if tag == "neg" else abs(v))
    if tag in ("add", "mul"):
        out = Fraction(0 if tag == "add" else 1)
        for x in node[1]:
            v = _exact(x)
            if v is None:
                return None
            out = out + v if tag == "add" else out * v
            if out.numerator.bit_length() + out.denominator.bit_length() > MAX_EXACT_BITS:
                return None  # huge rationals make every later gcd slow
        return out
    if tag == "pow":
        b, e = _exact(node[1]), _exact(node[2])
        if b is None or e is None:
            return None
        if e.denominator != 1:
            if e.denominator > 64:
                return None
            b = _exact_root(b, e.denominator)
            if b is None:
                return None
        n = e.numerator
        if (b == 0 and n < 0) or not _pow_fits(b, n):
            return None
        return b**n
    if tag in ("fact", "binom"):
        args = [_exact(x) for x in node[1:]]
        if any(v is None or v.denominator != 1 or not 0 <= v <= 1000 for v in args):
            return None
        if tag == "fact":
            return Fraction(math.factorial(int(args[0])))
        return Fraction(math.comb(int(args[0]), int(args[1])))
    return None


@lru_cache(maxsize=16384)
def _symbols(node) -> frozenset:
    if node[0] == "sym":
        return frozenset([node[1]])
    out = frozenset()
    for x in node[1:]:
        if isinstance(x, tuple):
            for y in x if x and isinstance(x[0], tuple) else (x,):
                out |= _symbols(y)
    return out


@lru_cache(maxsize=16384)
def _has_inf(node) -> bool:
    if node[0] == "oo":
        return True
    return any(
        _has_inf(y)
        for x in node[1:]
        if isinstance(x, tuple)
        for y in (x if x and isinstance(x[0], tuple) else (x,))
    )


def _inf_sign(node) -> int | None:
    if node == ("oo",):
        return 1
    if node[0] == "neg" and node[1] == ("oo",):
        return -1
    return None


_MPCTX = None  # private mpmath context: its precision never touches the global mpmath.mp


def _mp():
    global _MPCTX
    if _MPCTX is None:
        import mpmath

        ctx = mpmath.MPContext()
        ctx.dps = 40
        _MPCTX = ctx
    return _MPCTX


# Fixed "random" points for the numeric identity test: 3 points, a value per symbol (by
# sorted position), all positive so that sqrt/log of a symbol take their real branch.
_POINTS = (
    (0.7316, 1.2913, 0.4189, 1.5871, 0.9257, 1.1342, 0.6043, 1.4678),
    (1.3759, 0.5522, 1.1867, 0.8394, 1.6127, 0.4871, 1.0538, 0.7209),
    (0.4627, 0.9871, 1.5334, 1.2176, 0.6712, 1.4093, 0.8849, 1.1521),
)
_MAX_SYMBOLS = len(_POINTS[0])
_MP_FUNCS = {
    "sin": "sin", "cos": "cos", "tan": "tan", "cot": "cot", "sec": "sec", "csc": "csc",
    "asin": "asin", "acos": "acos", "atan": "atan", "sinh": "sinh", "cosh": "cosh",
    "tanh": "tanh", "log": "log", "exp": "exp",
}


def _evaluate(node, env: dict, ctx):
    tag = node[0]
    if tag == "num":
        return ctx.mpf(node[1].numerator) / node[1].denominator
    if tag == "sym":
        return env[node[1]]
    if tag in ("pi", "E", "I"):
        return {"pi": ctx.pi, "E": ctx.e, "I": ctx.j}[tag]
    if tag == "neg":
        return -_evaluate(node[1], env, ctx)
    if tag == "add":
        return ctx.fsum(_evaluate(x, env, ctx) for x in node[1])
    if tag == "mul":
        out = ctx.mpf(1)
        for x in node[1]:
            out = out * _evaluate(x, env, ctx)
        return out
    if tag == "pow":
        b, e = _evaluate(node[1], env, ctx), _evaluate(node[2], env, ctx)
        if abs(e) > 1e6 or (b == 0 and ctx.re(e) <= 0):
            raise _EvalError("power out of range")
        return ctx.power(b, e)
    if tag == "fn":
        x = _evaluate(node[2], env, ctx)
        if node[1] == "log" and x == 0:
            raise _EvalError("log(0)")
        if node[1] not in ("log", "asin", "acos", "atan") and abs(x) > 1e6:
            raise _EvalError("argument too large")  # sin(10^(10^5)) needs pi to 10^5 digits
        return getattr(ctx, _MP_FUNCS[node[1]])(x)
    if tag == "abs":
        return abs(_evaluate(node[1], env, ctx))
    if tag in ("fact", "binom"):
        v = _exact(node)
        if v is None:
            raise _EvalError("factorial out of range")
        return ctx.mpf(v.numerator) / v.denominator
    raise _EvalError(f"cannot evaluate {tag}")


@lru_cache(maxsize=16384)
def _values(node, names: tuple) -> tuple | None:
    """The AST's value (mpc) at each of the fixed points, or None when not evaluable."""
    if len(names) > _MAX_SYMBOLS:
        return None
    ctx = _mp()
    out = []
    try:
        for point in _POINTS if names else _POINTS[:1]:  # a constant needs one evaluation
            env = {n: ctx.mpf(point[k]) for k, n in enumerate(names)}
            v = ctx.mpc(_evaluate(node, env, ctx))
            if not (ctx.isfinite(v.real) and ctx.isfinite(v.imag)):
                return None
            out.append(v)
    except Exception:  # _EvalError, ZeroDivisionError, mpmath's NoConvergence, deep trees ...
        return None
    return tuple(out)


def _close(a, b) -> bool:
    return abs(a - b) <= 1e-30 * max(1, abs(a), abs(b))


# ----------------------------------------------------------------------------- sympy


def _timer_available() -> bool:
    # SIGALRM can be set only from the main thread; and we must not clobber a caller's timer.
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        and signal.getsignal(signal.SIGALRM) is not None  # None: set outside Python, can't restore
    )


def _raise_timeout(signum, frame):
    raise _Timeout()


def _with_time_limit(fn, seconds: float):
    """fn() under a SIGALRM timer; None on timeout. Call only when _timer_available()."""
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, seconds)
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Timeout:
        return None
    finally:
        signal.signal(signal.SIGALRM, previous)


_SYMPY_FUNCS = {"asin": "asin", "acos": "acos", "atan": "atan"}


def _to_sympy(node):
    import sympy as sp

    tag = node[0]
    if tag == "num":
        return sp.Rational(node[1].numerator, node[1].denominator)
    if tag == "sym":
        return sp.Symbol(node[1], positive=True)  # positive, like the numeric test points
    if tag in ("pi", "E", "I"):
        return {"pi": sp.pi, "E": sp.E, "I": sp.I}[tag]
    if tag == "neg":
        return -_to_sympy(node[1])
    if tag == "add":
        return sp.Add(*[_to_sympy(x) for x in node[1]])
    if tag == "mul":
        return sp.Mul(*[_to_sympy(x) for x in node[1]])
    if tag == "pow":
        # sympy evaluates Integer powers eagerly: 10^(10^10) would never return.
        b, e = _exact(node[1]), _exact(node[2])
        if e is not None and abs(e) > 1000:
            raise _EvalError("exponent too large")
        if b is not None and e is not None and not _pow_fits(b, e.numerator):
            raise _EvalError("power too large")
        return sp.Pow(_to_sympy(node[1]), _to_sympy(node[2]))
    if tag == "fn":
        return getattr(sp, node[1])(_to_sympy(node[2]))
    if tag == "abs":
        return sp.Abs(_to_sympy(node[1]))
    if tag in ("fact", "binom"):
        v = _exact(node)
        if v is None:
            raise _EvalError("factorial out of range")
        return sp.Rational(v.numerator, v.denominator)
    raise _EvalError(f"no sympy form for {tag}")


_budget = threading.local()  # .deadline: time.monotonic() after which sympy is not started


def _sympy_says_equal(a, b) -> bool | None:
    """sympy's verdict on a == b (True / False), or None when it gives none in time."""
    seconds = getattr(_budget, "deadline", 0.0) - time.monotonic()
    if seconds < 0.01 or not _timer_available():
        return None
    import sympy  # noqa: F401  (imported outside the timer: an interrupted import is broken)

    def prove():
        diff = _to_sympy(a) - _to_sympy(b)
        return True if diff == 0 else diff.equals(0)

    try:
        return _with_time_limit(prove, seconds)
    except Exception:  # sympy internals on odd input: no verdict, the numbers decide
        return None


# ----------------------------------------------------------------------------- answers
# An answer is a structure of elements:
#   ("one", e)  ("list", es) unordered: "1, -2" or 1 \pm \sqrt{19}   ("set", es) \{..\}
#   ("tup", open, close, es) tuples and intervals, brackets matter   ("union", parts)
#   ("mat", rows)
# and an element is ("x", ast) | ("eq", lhs, rhs, var or None) | ("text", words)
#   | ("mc", letter) | ("base", digits, base) | ("raw", squashed string)

_VAR_RE = re.compile(r"[a-zA-Z](?:_\{?\w+\}?)?(?:\([a-zA-Z]\))?")
_INEQ = {"<": ("(", ")"), "\\leq": ("[", "]"), ">": ("(", ")"), "\\geq": ("[", "]")}
_INEQ_OPS = r"(<|>|\\leq|\\geq)"
_MATRIX_RE = re.compile(r"\\begin\{([pbBvV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", re.S)


def _parse_elem(s: str):
    s = s.strip()
    parts = _split_top(s, "=")
    if len(parts) == 2:
        lhs, rhs = parts[0].strip(), parts[1].strip()
        right = _parse_expr(rhs)
        if _VAR_RE.fullmatch(lhs) and right is not None:
            return ("eq", ("sym", lhs), right, lhs)
        left = _parse_expr(lhs)
        if left is not None and right is not None:
            return ("eq", left, right, None)
        return ("raw", _squash(s))
    ast = _parse_expr(s) if len(parts) == 1 else None
    return ("x", ast) if ast is not None else ("raw", _squash(s))


def _expand_pm(s: str) -> list[str]:
    n = s.count("\\pm") + s.count("\\mp")
    if n != 1:
        return [s]
    if "\\pm" in s:
        return [s.replace("\\pm", "+"), s.replace("\\pm", "-")]
    return [s.replace("\\mp", "-"), s.replace("\\mp", "+")]


def _parse_elems(parts: list[str]) -> tuple:
    return tuple(_parse_elem(p) for part in parts for p in _expand_pm(part))


def _inequality_to_interval(s: str) -> str:
    m = re.fullmatch(rf"([a-zA-Z])\s*{_INEQ_OPS}\s*(.+)", s)
    if m and "<" not in m.group(3) and "\\leq" not in m.group(3):
        op, bound = m.group(2), m.group(3)
        if op in ("<", "\\leq"):
            return f"(-\\infty,{bound}{_INEQ[op][1]}"
        return f"{_INEQ[op][0]}{bound},\\infty)"
    m = re.fullmatch(r"(.+?)\s*(<|\\leq)\s*([a-zA-Z])\s*(<|\\leq)\s*(.+)", s)
    if m:
        return f"{_INEQ[m.group(2)][0]}{m.group(1)},{m.group(5)}{_INEQ[m.group(4)][1]}"
    return s


def _parse_structure(s: str):
    s = s.strip()
    if not s:
        return ("one", ("raw", ""))
    m = _MATRIX_RE.fullmatch(s)
    if m:
        rows = [r for r in re.split(r"\\\\", m.group(2)) if r.strip()]
        cells = tuple(tuple(_parse_elem(c) for c in r.split("&")) for r in rows)
        if cells and len({len(r) for r in cells}) == 1:
            return ("mat", cells)
        return ("one", ("raw", _squash(s)))
    if s.startswith("\\{") and s.endswith("\\}") and _wraps_whole(s, 1):
        return ("set", _parse_elems(_split_top(s[2:-2], ",")))
    parts = _split_top(s, "\\cup")
    if len(parts) > 1:
        return ("union", tuple(_parse_structure(p) for p in parts))
    if s[0] in "([" and s[-1] in ")]" and _wraps_whole(s, 0):
        inner = _split_top(s[1:-1], ",")
        if len(inner) > 1:
            return ("tup", s[0], s[-1], _parse_elems(inner))
    parts = _split_top(s, ",")
    elems = _parse_elems(parts)
    if len(elems) > 1:
        return ("list", elems)
    return ("one", elems[0])


def _parse_answer(answer: str):
    """The structure of a MATH-style answer (cached: gold answers repeat across calls)."""
    if len(answer) > MAX_ANSWER_CHARS:  # not cached: a megabyte key would stay in memory
        return ("one", ("raw", _squash(answer)))
    return _parse_answer_cached(answer)


@lru_cache(maxsize=16384)
def _parse_answer_cached(answer: str):
    s = _clean(answer)
    if _max_depth(s) > MAX_DEPTH:
        return ("one", ("raw", _squash(s)))
    m = re.fullmatch(r"\(?([A-E])\)(?:\s.*)?|\(?([A-E])", s)  # multiple choice: (C), C, (C) 12
    if m:
        return ("one", ("mc", m.group(1) or m.group(2)))
    if re.fullmatch(r"[A-Za-z]+(?: [A-Za-z]+)*", s) and re.search(r"[A-Za-z]{3}", s):
        return ("one", ("text", s.lower()))
    m = re.fullmatch(r"(\d+)_\{?(\d+)\}?", s)  # base-b numbers: 52_8, 4210_{5}
    if m:
        return ("one", ("base", m.group(1), m.group(2)))
    s = re.sub(r"^[a-zA-Z]\s*\\in\s*", "", s)  # x \in [-2, 7]
    s = _inequality_to_interval(s)
    return _parse_structure(s)


def _unordered_equal(ps, gs, equal) -> bool:
    if len(ps) != len(gs):
        return False
    unused = list(ps)
    for g in gs:
        for k, p in enumerate(unused):
            if equal(p, g):
                del unused[k]
                break
        else:
            return False
    return True


def _structure_equal(p, g) -> bool:
    kp, kg = p[0], g[0]
    if kp == "one" and kg == "one":
        return _elem_equal(p[1], g[1])
    if kp in ("list", "set") and kg in ("list", "set"):
        return _unordered_equal(p[1], g[1], _elem_equal)
    if kp == "tup" and kg == "tup":
        return (
            p[1:3] == g[1:3]
            and len(p[3]) == len(g[3])
            and all(_elem_equal(x, y) for x, y in zip(p[3], g[3]))
        )
    if kp == "union" and kg == "union":
        return _unordered_equal(p[1], g[1], _structure_equal)
    if kp == "mat" and kg == "mat":
        return [len(r) for r in p[1]] == [len(r) for r in g[1]] and all(
            _elem_equal(x, y) for rp, rg in zip(p[1], g[1]) for x, y in zip(rp, rg)
        )
    return False


def _elem_equal(p, g) -> bool:
    if p == g:
        return True
    if p[0] == "eq" and g[0] == "eq":
        if p[3] and g[3]:  # x = 5 vs y = 5: the value is what was asked for
            return _expr_equal(p[2], g[2])
        return _equation_equal(p, g)
    # "x = 5" against "5", "y = 2x + 3" against "2x + 3": compare the defining side.
    if p[0] == "eq" and p[3] and g[0] == "x":
        return _expr_equal(p[2], g[1])
    if g[0] == "eq" and g[3] and p[0] == "x":
        return _expr_equal(p[1], g[2])
    if p[0] == "x" and g[0] == "x":
        return _expr_equal(p[1], g[1])
    if g[0] == "base" and p[0] == "x":  # digits without the subscript: 52 for 52_8
        return p[1][0] == "num" and str(p[1][1]) == str(int(g[1]))
    return False


def _expr_equal(a, b) -> bool:
    if a == b:
        return True
    if _has_inf(a) or _has_inf(b):
        return _inf_sign(a) is not None and _inf_sign(a) == _inf_sign(b)
    qa, qb = _exact(a), _exact(b)
    if qa is not None and qb is not None:
        return qa == qb
    names = _symbols(a)
    if names != _symbols(b) or _factored(a) != _factored(b):
        return False
    names = tuple(sorted(names))
    va, vb = _values(a, names), _values(b, names)
    if va is None or vb is None:
        return False  # out of numeric reach (a power like 10^(10^10), a pole at a test point)
    if not all(map(_close, va, vb)):
        return False  # the numbers differ: no proof needed
    # Equal to 30 digits at 3 points. sympy may still refute that (a huge cancellation like
    # (x+1)^1000 - x^1000). Without a sympy verdict (no timer here, timeout) the numbers
    # stand, except for constants too large for 30 digits to see a difference of 1.
    verdict = _sympy_says_equal(a, b)
    if verdict is not None:
        return verdict
    return bool(names) or all(abs(v) < 1e15 for v in va)


def _factored(node) -> bool:
    """A product of polynomial factors, one a sum: (a+5)(b+2), 3(x-1)^2.

    Such an answer and its expansion are different answers: MATH asks for one form
    ("Factor ab+5b+2a+10") and the other form is the question restated.
    """
    while node[0] == "neg":
        node = node[1]
    factors = node[1] if node[0] == "mul" else (node,)
    bases = []
    for f in factors:
        base, exp = (f[1], _exact(f[2])) if f[0] == "pow" else (f, Fraction(1))
        if not _symbols(f):
            continue
        if exp is None or exp.denominator != 1 or exp < 1:
            return False  # a quotient or a root: not a factored polynomial
        bases += [base] * min(int(exp), 2)
    return len(bases) >= 2 and any(b[0] == "add" for b in bases)


def _equation_equal(p, g) -> bool:
    """Equations are equal when (lhs - rhs) of one is a nonzero constant times the other's."""
    dp = ("add", (p[1], ("neg", p[2])))
    dg = ("add", (g[1], ("neg", g[2])))
    names = _symbols(dp)
    if names != _symbols(dg):
        return False
    names = tuple(sorted(names))
    vp, vg = _values(dp, names), _values(dg, names)
    if vp is None or vg is None or any(abs(x) < 1e-25 for x in vp + vg):
        return False
    ratios = [x / y for x, y in zip(vp, vg)]
    return all(_close(r, ratios[0]) for r in ratios)


# ----------------------------------------------------------------------------- numbers


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
    ast = _parse_expr(s)
    return None if ast is None else _exact(ast)


def _gold_text(gold: str, dataset: str) -> str:
    if dataset == "gsm8k" and "####" in gold:  # a whole GSM8K solution was passed
        return gold.rsplit("####", 1)[1]
    return gold


# ----------------------------------------------------------------------------- public API


def is_equivalent(pred: str | None, gold: str, dataset: str) -> bool:
    """True when the extracted answer `pred` means the same as the gold answer.

    gsm8k, aime24: both sides as exact numbers (commas, $, %, units, 18.00, 025, \\frac{1}{2}
    = 0.5, "x = 5"); a gold that is not a number is compared like math500.
    math500: LaTeX answers compared by structure (tuple/interval brackets, sets, unordered
    solution lists, \\pm, matrices, equations, "y = ..." vs the bare right side) and per
    element by value: exact for rationals, otherwise numeric at three points plus sympy.
    """
    _check_dataset(dataset)
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    gold = _gold_text(gold, dataset)
    _budget.deadline = time.monotonic() + SYMPY_SECONDS
    try:
        if dataset in ("gsm8k", "aime24"):
            g = _number(gold)
            if g is not None:
                p = _number(pred)
                return p is not None and p == g
        return _structure_equal(_parse_answer(pred), _parse_answer(gold))
    except Exception:  # a bug must not take down a whole evaluation run: judge it wrong
        return False


def grade(response_text: str, gold: str, dataset: str) -> bool:
    """Is the final answer of a model response correct? (extract_answer + is_equivalent)"""
    return is_equivalent(extract_answer(response_text, dataset), gold, dataset)


def _fmt(v) -> str:
    ctx = _mp()
    re_, im = v.real, v.imag
    scale = max(abs(re_), abs(im), 1)
    parts = [ctx.nstr(x, 12) if abs(x) > 1e-25 * scale else "0" for x in (re_, im)]
    return parts[0] if parts[1] == "0" else f"{parts[0]}{'+' if im > 0 else ''}{parts[1]}j"


def _expr_key(ast) -> str:
    if _has_inf(ast):
        return {1: "oo", -1: "-oo"}.get(_inf_sign(ast), f"s:{ast!r}")
    q = _exact(ast)
    if q is not None:
        return f"q:{q}"
    names = tuple(sorted(_symbols(ast)))
    vals = _values(ast, names)
    if vals is None:
        return f"s:{ast!r}"
    form = "factored" if _factored(ast) else "v"
    return f"{form}:{','.join(names)}:{';'.join(_fmt(v) for v in vals)}"


def _elem_key(e) -> str:
    tag = e[0]
    if tag == "x":
        return _expr_key(e[1])
    if tag == "eq":
        if e[3]:
            return _expr_key(e[2])
        d = ("add", (e[1], ("neg", e[2])))
        names = tuple(sorted(_symbols(d)))
        vals = _values(d, names)
        if vals is None or abs(vals[0]) < 1e-25:
            return f"s:{e!r}"
        return f"eq:{','.join(names)}:{';'.join(_fmt(v / vals[0]) for v in vals)}"
    if tag == "base":
        return f"b:{int(e[1])}_{e[2]}"
    return f"{tag}:{e[1]}"


def _structure_key(st) -> str:
    tag = st[0]
    if tag == "one":
        return _elem_key(st[1])
    if tag in ("list", "set"):
        return "{" + "|".join(sorted(_elem_key(e) for e in st[1])) + "}"
    if tag == "tup":
        return st[1] + "|".join(_elem_key(e) for e in st[3]) + st[2]
    if tag == "union":
        return "U(" + "|".join(sorted(_structure_key(p) for p in st[1])) + ")"
    return "M[" + "//".join("|".join(_elem_key(e) for e in row) for row in st[1]) + "]"


def answer_key(answer: str | None, dataset: str) -> str:
    """Canonical string for majority votes: equivalent answers written differently share it.

    Exact rationals key by value ("q:1080"), other expressions by their 12-digit values at
    the test points, structures by their parts (sorted where order does not matter). Keys
    agree with is_equivalent except in rare cross-notation cases (52 vs 52_8, a rational
    written as sin(pi/6)); group_answers uses is_equivalent itself. None -> "".
    """
    _check_dataset(dataset)
    if not isinstance(answer, str):
        return ""
    try:
        if dataset in ("gsm8k", "aime24"):
            v = _number(answer)
            if v is not None:
                return f"q:{v}"
        return _structure_key(_parse_answer(answer))
    except Exception:
        return "s:" + _squash(answer[:MAX_ANSWER_CHARS])


def group_answers(answers: list[str | None], dataset: str) -> list[list[int]]:
    """Indices of `answers` grouped by equivalence, groups in order of first appearance.

    None (no extractable answer) belongs to no group. SSB uses this to find the most common
    wrong answer: the largest group whose representative is not equivalent to the gold.
    """
    _check_dataset(dataset)
    groups: list[list[int]] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for g in groups:
            if is_equivalent(a, answers[g[0]], dataset):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups
