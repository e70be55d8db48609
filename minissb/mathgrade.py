"""MATH-500 answers: a LaTeX parser, answer structures, and comparison by value.

The half of minissb.grader that reads LaTeX: the grader extracts and cleans an answer (units,
$, \\left, \\dfrac); this module parses the cleaned string and compares two of them. GSM8K
and AIME use only its parser and exact arithmetic (`rational`: \\frac{1}{2} is 0.5). It
never imports minissb.grader.

Read top to bottom:
  strings   bracket-aware splitting: "(1,2], 3" splits in two, not three
  parse     a small recursive-descent LaTeX parser into a tuple AST (no eval, no sympy)
  evaluate  an AST as an exact rational in plain Python, else its value at three fixed
            points (mpmath, 40 digits)
  sympy     a proof of a == b under a SIGALRM timer
  answers   parse_answer: the structure around the expressions (tuple, interval, set,
            matrix, list, labelled values "(p,q) = (3,2)", inequalities as intervals)
  compare   structure first, after putting both sides in one shape ((1,2,3) and a column
            vector, c\\mathbf{I} and a square matrix), then each element: rationals exactly;
            anything else must agree to 30 digits at the three points, then sympy, under a
            time limit, proves or refutes the identity where it can run
  entry     rational, as_string, answers_equal: with parse_answer, what the grader calls

The answer and the gold play one different role: a factored gold asks for the factored form,
a factored answer to an expanded gold is right (see _factored).

Bounded time on any input: strings longer than MAX_ANSWER_CHARS or nested deeper than
MAX_DEPTH are compared as strings; powers and factorials are size-checked before any
arithmetic; sympy runs only under a SIGALRM timer, which exists only in the main thread.
Elsewhere (a worker thread, or a caller already using SIGALRM) the numeric test decides alone.
"""

from __future__ import annotations

import math
import re
import signal
import threading
import time
from fractions import Fraction
from functools import lru_cache
from itertools import accumulate

MAX_ANSWER_CHARS = 1000  # longer "answers" are garbage: compared as strings, never parsed
MAX_DEPTH = 40  # bracket nesting allowed before parsing (the parser is recursive)
MAX_DIGITS = 200  # longest number literal the parser accepts
SYMPY_SECONDS = 1.0  # sympy time allowed per comparison (all its proofs together)
MAX_EXACT_BITS = 100_000  # exact powers/factorials larger than this are not computed
# Parse and evaluation failures raise ValueError: the caller's answer is "not understood".


class _Timeout(BaseException):
    # BaseException so that sympy's internal `except Exception` blocks cannot swallow it.
    pass


# ----------------------------------------------------------------------------- strings


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


def _depths(s: str):
    """The bracket depth after each character of s."""
    return accumulate(1 if c in "([{" else -1 if c in ")]}" else 0 for c in s)


def _max_depth(s: str) -> int:
    return max(_depths(s), default=0)


def _split_top(s: str, sep: str) -> list[str]:
    """Split on `sep` outside any (), [] or {} (intervals like (3,4] count as balanced)."""
    parts, depth, start = [], 0, 0
    for m in re.finditer(r"[(\[{)\]}]|" + re.escape(sep), s):
        depth += 1 if m.group() in "([{" else -1 if m.group() in ")]}" else 0
        if depth == 0 and m.group() == sep:
            parts.append(s[start : m.start()])
            start = m.end()
    return parts + [s[start:]]


def _wraps_whole(s: str, start: int) -> bool:
    """True when the bracket at s[start] closes exactly at the last character."""
    return next((i for i, d in enumerate(_depths(s[start:])) if d == 0), -1) == len(s) - start - 1


# ----------------------------------------------------------------------------- parsing
# AST nodes are tuples: ("num", Fraction) ("sym", name) ("pi",) ("E",) ("I",) ("oo",)
# ("neg", x) ("add", xs) ("mul", xs) ("pow", base, exp) ("fn", name, x) ("fact", x)
# ("binom", n, k) ("abs", x). a/b is ("mul", (a, ("pow", b, -1))).

_TOKEN_RE = re.compile(r"\s*(?:(\\[a-zA-Z]+|\\[{}|])|(\d+(?:\.\d*)?|\.\d+)|([a-zA-Z])|(\S))")
_FUNCS = {  # LaTeX name -> mpmath and sympy name
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
    """Recursive descent over the tokens: expr > term > unary > power > postfix > atom."""

    def __init__(self, s: str):
        self.toks = [m.group(m.lastindex) for m in _TOKEN_RE.finditer(s)]
        self.i = self.depth = self.in_abs = 0

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> str:
        if self.i >= len(self.toks):
            raise ValueError("unexpected end")
        self.i += 1
        return self.toks[self.i - 1]

    def accept(self, tok: str) -> bool:
        if self.peek() != tok:
            return False
        self.i += 1
        return True

    def expect(self, tok: str) -> None:
        if self.take() != tok:
            raise ValueError(f"expected {tok}")

    def until(self, tok: str):
        """An expression, then the token `tok` that closes it."""
        x = self.expr()
        self.expect(tok)
        return x

    def enter(self, limit: int) -> None:
        """One level deeper: the parser is recursive, so its depth is bounded."""
        self.depth += 1
        if self.depth > limit * MAX_DEPTH:
            raise ValueError("too deep")

    def expr(self):
        self.enter(2)
        terms = [self.term()]
        while self.peek() in ("+", "-"):
            terms.append(self.term() if self.take() == "+" else ("neg", self.term()))
        self.depth -= 1
        return terms[0] if len(terms) == 1 else ("add", tuple(terms))

    def term(self):
        factors = [self.unary()]
        while True:
            t = self.peek()
            if t in _MUL_OPS or t in _DIV_OPS:
                self.take()
                x = self.unary()
                factors.append(x if t in _MUL_OPS else ("pow", x, _MINUS_ONE))
            elif self.starts_atom(t):  # implicit product: 2\pi, 3\sqrt{13}, (a+5)(b+2)
                factors.append(self.power())
            else:
                return factors[0] if len(factors) == 1 else ("mul", tuple(factors))

    def unary(self):
        if self.peek() not in ("-", "+"):
            return self.power()
        self.enter(2)
        x = self.unary() if self.take() == "+" else ("neg", self.unary())
        self.depth -= 1
        return x

    def power(self):
        base = self.postfix()
        return ("pow", base, self.exponent()) if self.accept("^") else base

    def exponent(self):
        if self.peek() == "{":
            return self.group()
        if self.peek() in ("-", "+"):
            return self.postfix() if self.take() == "+" else ("neg", self.postfix())
        return self.postfix()

    def postfix(self):
        self.enter(4)  # \sqrt\sqrt\sqrt... nests without brackets: counted here too
        x = self.atom()
        self.depth -= 1
        return ("fact", x) if self.accept("!") else x

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
        return self.until("}")

    def arg(self):
        return self.group() if self.peek() == "{" else self.postfix()

    def atom(self):
        t = self.take()
        if t[0].isdigit() or (t[0] == "." and len(t) > 1):
            if len(t) > MAX_DIGITS:
                raise ValueError("number too long")
            return ("num", Fraction(t.rstrip(".") or "0"))
        if len(t) == 1 and t.isalpha():
            if not self.accept("_"):
                return {"i": ("I",), "e": ("E",)}.get(t, ("sym", t))
            sub = self.take()  # x_1, a_{n}
            if sub == "{":
                parts = []
                while self.peek() not in ("}", None):
                    parts.append(self.take())
                self.expect("}")
                sub = "".join(parts)
            return ("sym", f"{t}_{sub}")
        if t in ("(", "{"):
            return self.until(")" if t == "(" else "}")
        if t == "|":
            self.in_abs += 1
            x = ("abs", self.until("|"))
            self.in_abs -= 1
            return x
        if t == "\\frac":
            num, den = self.arg(), self.arg()
            return ("mul", (num, ("pow", den, _MINUS_ONE)))
        if t == "\\sqrt":  # \sqrt[3]{x}
            index = self.until("]") if self.accept("[") else None
            return ("pow", self.arg(), _HALF if index is None else ("pow", index, _MINUS_ONE))
        if t == "\\binom":
            return ("binom", self.arg(), self.arg())
        if t in ("\\pi", "\\infty"):
            return ("pi",) if t == "\\pi" else ("oo",)
        if t[0] == "\\" and t[1:] in _GREEK:
            return ("sym", t[1:])
        if t[0] == "\\" and t[1:] in _FUNCS:
            return self.function(_FUNCS[t[1:]])
        raise ValueError(f"unexpected {t!r}")

    def function(self, name: str):
        base = self.arg() if name == "log" and self.accept("_") else None
        power = self.exponent() if self.accept("^") else None  # \sin^2 x
        if self.accept("("):
            x = self.until(")")
        else:  # \cot x, \sin 2x: the following run of numbers and letters
            factors = [self.power()]
            while self.peek() is not None and self.peek()[0].isalnum():
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
        parser = _Parser(s)
        node = parser.expr()
        return node if parser.i == len(parser.toks) else None
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


# ----------------------------------------------------------------------------- evaluation


def _bits(q: Fraction) -> int:
    return q.numerator.bit_length() + q.denominator.bit_length()


def _exact_root(q: Fraction, n: int) -> Fraction | None:
    if q < 0:
        r = None if n % 2 == 0 else _exact_root(-q, n)
        return None if r is None else -r
    out = []
    for v in (q.numerator, q.denominator):
        if n != 2 and v.bit_length() > 150:
            return None
        r = math.isqrt(v) if n == 2 else round(v ** (1.0 / n))  # a float root is within 1
        r = next((c for c in (r - 1, r, r + 1) if c >= 0 and c**n == v), None)
        if r is None:
            return None
        out.append(r)
    return Fraction(out[0], out[1])


def _pow_fits(base: Fraction, n: int) -> bool:
    return abs(n) <= 10_000 and _bits(base) * abs(n) <= MAX_EXACT_BITS


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
            if _bits(out) > MAX_EXACT_BITS:
                return None  # huge rationals make every later gcd slow
        return out
    if tag == "pow":
        b, e = _exact(node[1]), _exact(node[2])
        if b is None or e is None:
            return None
        if e.denominator != 1:
            b = _exact_root(b, e.denominator) if e.denominator <= 64 else None
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
        n = [int(v) for v in args]
        return Fraction(math.factorial(*n) if tag == "fact" else math.comb(*n))
    return None


def _children(node):
    """The sub-ASTs of a node: two in ("add", (x, y)) and ("pow", b, e), one in ("fn", name, x)."""
    for x in node[1:]:
        if isinstance(x, tuple):
            yield from (x if x and isinstance(x[0], tuple) else (x,))


@lru_cache(maxsize=16384)
def _symbols(node) -> frozenset:
    if node[0] == "sym":
        return frozenset([node[1]])
    return frozenset().union(*map(_symbols, _children(node)))


@lru_cache(maxsize=16384)
def _has_inf(node) -> bool:
    return node[0] == "oo" or any(map(_has_inf, _children(node)))


@lru_cache(maxsize=None)
def _mp():
    """A private mpmath context of 40 digits: its precision never touches mpmath.mp."""
    import mpmath

    ctx = mpmath.MPContext()
    ctx.dps = 40
    return ctx


# Fixed "random" points for the numeric identity test: 3 points, a value per symbol (by
# sorted position), all positive so that sqrt/log of a symbol take their real branch.
_POINTS = (
    (0.7316, 1.2913, 0.4189, 1.5871, 0.9257, 1.1342, 0.6043, 1.4678),
    (1.3759, 0.5522, 1.1867, 0.8394, 1.6127, 0.4871, 1.0538, 0.7209),
    (0.4627, 0.9871, 1.5334, 1.2176, 0.6712, 1.4093, 0.8849, 1.1521),
)


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
        return ctx.fprod(_evaluate(x, env, ctx) for x in node[1])
    if tag == "pow":
        b, e = _evaluate(node[1], env, ctx), _evaluate(node[2], env, ctx)
        if abs(e) > 1e6 or (b == 0 and ctx.re(e) <= 0):
            raise ValueError("power out of range")
        return ctx.power(b, e)
    if tag == "fn":
        x = _evaluate(node[2], env, ctx)
        if node[1] == "log" and x == 0:
            raise ValueError("log(0)")
        if node[1] not in ("log", "asin", "acos", "atan") and abs(x) > 1e6:
            raise ValueError("argument too large")  # sin(10^(10^5)) needs pi to 10^5 digits
        return getattr(ctx, node[1])(x)
    if tag == "abs":
        return abs(_evaluate(node[1], env, ctx))
    v = _exact(node) if tag in ("fact", "binom") else None
    if v is None:
        raise ValueError(f"cannot evaluate {tag}")
    return ctx.mpf(v.numerator) / v.denominator


@lru_cache(maxsize=16384)
def _values(node, names: tuple) -> tuple | None:
    """The AST's value (mpc) at each of the fixed points, or None when not evaluable."""
    if len(names) > len(_POINTS[0]):
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
    except Exception:  # ValueError, ZeroDivisionError, mpmath's NoConvergence, deep trees ...
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
    if tag in ("add", "mul"):
        return (sp.Add if tag == "add" else sp.Mul)(*[_to_sympy(x) for x in node[1]])
    if tag == "pow":
        # sympy evaluates Integer powers eagerly: 10^(10^10) would never return.
        b, e = _exact(node[1]), _exact(node[2])
        if e is not None and (abs(e) > 1000 or b is not None and not _pow_fits(b, e.numerator)):
            raise ValueError("power too large")
        return sp.Pow(_to_sympy(node[1]), _to_sympy(node[2]))
    if tag == "fn":
        return getattr(sp, node[1])(_to_sympy(node[2]))
    if tag == "abs":
        return sp.Abs(_to_sympy(node[1]))
    v = _exact(node) if tag in ("fact", "binom") else None
    if v is None:
        raise ValueError(f"no sympy form for {tag}")
    return sp.Rational(v.numerator, v.denominator)


_budget = threading.local()  # .deadline: time.monotonic() after which sympy is not started


def _sympy_says_equal(a, b) -> bool | None:
    """sympy's verdict on a == b (True / False), or None when it gives none in time."""
    seconds = getattr(_budget, "deadline", 0.0) - time.monotonic()
    if seconds < 0.01 or not _timer_available():
        return None
    import sympy  # noqa: F401  (imported outside the timer: an interrupted import is broken)

    try:
        previous = signal.signal(signal.SIGALRM, _raise_timeout)
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, seconds)
                diff = _to_sympy(a) - _to_sympy(b)
                return True if diff == 0 else diff.equals(0)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous)
    except (_Timeout, Exception):  # out of time, or sympy internals on odd input: no verdict
        return None


# ----------------------------------------------------------------------------- answers
# An answer is a structure of elements:
#   ("one", e)  ("list", es) unordered: "1, -2" or 1 \pm \sqrt{19}   ("set", es) \{..\}
#   ("tup", open, close, es) tuples and intervals, brackets matter   ("union", parts)
#   ("mat", rows)
# and an element is ("x", ast) | ("eq", lhs, rhs, label or None) | ("text", words)
#   | ("mc", letter) | ("base", digits, base) | ("raw", squashed string)
# A labelled element ("eq", ("sym", "x"), 5, "x") is "x = 5": the name of what was asked
# for and its value; an unlabelled "eq" is an equation such as 5x - 7y + 4 = 0.

_LABEL_RE = re.compile(
    r"[a-zA-Z](?:_\{?\w+\}?)?(?:\([a-zA-Z]\))?"  # x, a_1, a_{10}, f(x)
    r"|[A-Z]{2,3}|\\overline\{[A-Z]{2}\}|(?:m\s*)?\\angle\s*[A-Z]{1,3}"  # AB = 4, \angle ABC = 30
    rf"|\\(?:{'|'.join(sorted(_GREEK))})"  # \theta = \frac{\pi}{4}
)
_INEQ = {"<": ("(", ")"), "\\leq": ("[", "]"), ">": ("(", ")"), "\\geq": ("[", "]")}
_INEQ_OPS = r"(<|>|\\leq|\\geq)"
_FLIP = {"<": ">", ">": "<", "\\leq": "\\geq", "\\geq": "\\leq"}
_MATRIX_RE = re.compile(r"\\begin\{([pbBvV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", re.S)


def _parse_elem(s: str):
    # "x = 5+5+1 = 11": a chain states its value last; the first side names it.
    parts = _split_top(s.strip(), "=")
    right = _parse_expr(parts[-1])
    if right is not None:
        if len(parts) == 1:
            return ("x", right)
        lhs = parts[0].strip()
        if _LABEL_RE.fullmatch(lhs):
            return ("eq", ("sym", lhs), right, lhs)
        left = _parse_expr(lhs)
        if left is not None:
            if len(parts) == 2 and (_symbols(left) or _symbols(right)):
                return ("eq", left, right, None)
            return ("x", right)  # a computation, "5 + 6 = 11", or a chain "x + y = 2 + 3 = 5"
    return ("raw", _squash(s))


def _parse_elems(parts: list[str]) -> tuple:
    """The elements of `parts`, a part with one \\pm or \\mp read as its two values."""
    out = []
    for s in parts:
        if s.count("\\pm") + s.count("\\mp") == 1:
            out += [s.replace("\\pm", "+").replace("\\mp", "-"),
                    s.replace("\\pm", "-").replace("\\mp", "+")]
        else:
            out.append(s)
    return tuple(map(_parse_elem, out))


def _interval(var_op: str, bound: str) -> str:
    """The interval of `x op bound`."""
    if var_op in ("<", "\\leq"):
        return f"(-\\infty,{bound}{_INEQ[var_op][1]}"
    return f"{_INEQ[var_op][0]}{bound},\\infty)"


def _inequality_to_interval(s: str) -> str:
    m = re.fullmatch(rf"([a-zA-Z])\s*{_INEQ_OPS}\s*(.+)", s)
    if m and "<" not in m.group(3) and "\\leq" not in m.group(3):
        return _interval(m.group(2), m.group(3))
    m = re.fullmatch(rf"(.+?)\s*{_INEQ_OPS}\s*([a-zA-Z])", s)  # 5 \geq x is x \leq 5
    if m and not re.search(r"<|>|\\[lg]eq", m.group(1)):
        return _interval(_FLIP[m.group(2)], m.group(1))
    m = re.fullmatch(r"(.+?)\s*(<|\\leq)\s*([a-zA-Z])\s*(<|\\leq)\s*(.+)", s)
    if m:
        return f"{_INEQ[m.group(2)][0]}{m.group(1)},{m.group(5)}{_INEQ[m.group(4)][1]}"
    m = re.fullmatch(r"(.+?)\s*(>|\\geq)\s*([a-zA-Z])\s*(>|\\geq)\s*(.+)", s)  # 7 > x \geq -2
    if m:
        return f"{_INEQ[m.group(4)][0]}{m.group(5)},{m.group(1)}{_INEQ[m.group(2)][1]}"
    return s


def _parse_matrix(body: str):
    rows = [r for r in re.split(r"\\\\", body) if r.strip()]
    cells = tuple(tuple(_parse_elem(c) for c in r.split("&")) for r in rows)
    return ("mat", cells) if cells and len({len(r) for r in cells}) == 1 else None


def _scaled_matrix(s: str):
    """c \\begin{pmatrix}..\\end{pmatrix} (2, -, \\frac12 \\cdot): the product, cell by cell."""
    k = s.find("\\begin{")
    m = _MATRIX_RE.fullmatch(s, k) if k > 0 else None
    if not m:
        return None
    prefix = re.sub(r"(?:\\cdot|\\times|\*)\s*$", "", s[:k].strip()).strip()
    coef = {"-": _MINUS_ONE, "+": ("num", Fraction(1))}.get(prefix) or _parse_expr(prefix)
    mat = _parse_matrix(m.group(2))
    if coef is None or mat is None or any(c[0] != "x" for row in mat[1] for c in row):
        return None
    return ("mat", tuple(tuple(("x", ("mul", (coef, c[1]))) for c in row) for row in mat[1]))


def _labelled(s: str):
    """(p,q) = (3,2): the tuple, each value labelled; \\mathbf{v} = <matrix, set, tuple>: it.

    None when `s` is not one labelled structure (x = 5 is an element; x = 1, y = 2 a list).
    """
    parts = _split_top(s, "=")
    if len(parts) < 2 or len(_split_top(s, ",")) > 1:
        return None
    lhs, rhs = parts[0].strip(), parts[-1].strip()
    names = [n.strip() for n in lhs[1:-1].split(",")] if lhs[:1] == "(" and lhs[-1:] == ")" else []
    if len(names) > 1 and all(_LABEL_RE.fullmatch(n) for n in names):
        st = _parse_structure(rhs)
        if st[0] != "tup" or len(st[3]) != len(names):
            return None
        elems = [("eq", ("sym", n), e[1], n) if e[0] == "x" else e for n, e in zip(names, st[3])]
        return ("tup", st[1], st[2], tuple(elems))
    if _LABEL_RE.fullmatch(lhs):
        st = _parse_structure(rhs)
        return st if st[0] != "one" else None
    return None


def _parse_structure(s: str):
    s = s.strip()
    if not s:
        return ("one", ("raw", ""))
    m = _MATRIX_RE.fullmatch(s)
    if m:
        return _parse_matrix(m.group(2)) or as_string(s)
    st = _scaled_matrix(s) or _labelled(s)
    if st:
        return st
    if s.startswith("\\{") and s.endswith("\\}") and _wraps_whole(s, 1):
        return ("set", _parse_elems(_split_top(s[2:-2], ",")))
    parts = _split_top(s, "\\cup")
    if len(parts) > 1:
        return ("union", tuple(_parse_structure(p) for p in parts))
    if s[0] in "([" and s[-1] in ")]" and _wraps_whole(s, 0):
        inner = _split_top(s[1:-1], ",")
        if len(inner) > 1:
            return ("tup", s[0], s[-1], _parse_elems(inner))
    elems = _parse_elems(_split_top(s, ","))
    return ("list", elems) if len(elems) > 1 else ("one", elems[0])


def parse_answer(s: str):
    """The structure of an answer already cleaned by minissb.grader (see "answers" above)."""
    if _max_depth(s) > MAX_DEPTH:
        return as_string(s)
    m = re.fullmatch(r"\(?([A-E])\)(?:\s.*)?|\(?([A-E])", s)  # multiple choice: (C), C, (C) 12
    if m:
        return ("one", ("mc", m.group(1) or m.group(2)))
    if re.fullmatch(r"[A-Za-z]+(?: [A-Za-z]+)*", s) and re.search(r"[A-Za-z]{3}", s):
        return ("one", ("text", s.lower()))
    m = re.fullmatch(r"(\d+)_\{?(\d+)\}?", s)  # base-b numbers: 52_8, 4210_{5}
    if m:
        return ("one", ("base", m.group(1), m.group(2)))
    s = re.sub(r"^[a-zA-Z]\s*\\in\s*", "", s)  # x \in [-2, 7]
    return _parse_structure(_inequality_to_interval(s))


# ----------------------------------------------------------------------------- compare


def _unordered_equal(ps, gs, equal) -> bool:
    if len(ps) != len(gs):
        return False
    unused = list(ps)
    for g in gs:
        k = next((k for k, p in enumerate(unused) if equal(p, g)), None)
        if k is None:
            return False
        del unused[k]
    return True


def _by_label(ps, gs) -> bool | None:
    """a = 1, b = 2 against b = 2, a = 1: values matched by name, whatever the order.

    None unless both sides name every value with the same distinct names ("x = 1, x = -2"
    names no value apart, a bare "4, 5" says nothing about which is which).
    """
    names = {e[3] if e[0] == "eq" else None for e in ps}
    if None in names or len(names) != len(ps) or len(gs) != len(ps):
        return None
    if {e[3] if e[0] == "eq" else None for e in gs} != names:
        return None
    by_name = {e[3]: e[2] for e in gs}
    return all(_expr_equal(e[2], by_name[e[3]]) for e in ps)


def _identity(e, n: int):
    """The n x n matrix c*I of an element c\\mathbf{I} (I, -I, 2I, I_n), else None."""
    if e[0] != "x":
        return None
    node, signs = e[1], []
    while node[0] == "neg":
        node, signs = node[1], signs + [_MINUS_ONE]
    factors = node[1] if node[0] == "mul" else (node,)
    ids = [k for k, f in enumerate(factors) if f[0] == "sym" and f[1] in ("I", f"I_{n}")]
    others = [f for k, f in enumerate(factors) if k not in ids]
    if len(ids) != 1 or any(_symbols(f) for f in others):
        return None
    c = ("mul", (("num", Fraction(1)), *signs, *others))
    zero = ("num", Fraction(0))
    return ("mat", tuple(tuple(("x", c if i == j else zero) for j in range(n)) for i in range(n)))


def _same_shape(p, g):
    """(p, g) with one side rewritten in the other's form where both say the same thing:
    (1,2,3) as a column vector (MATH tells rows apart), c\\mathbf{I} as a square matrix."""
    for a, b, swap in ((p, g, False), (g, p, True)):
        if b[0] != "mat":
            continue
        rows, new = b[1], None
        if a[0] == "tup" and a[1:3] == ("(", ")") and len(rows) == len(a[3]) > 1:
            if all(len(r) == 1 for r in rows):
                new = ("mat", tuple((e,) for e in a[3]))
        elif a[0] == "one" and all(len(r) == len(rows) for r in rows):
            new = _identity(a[1], len(rows))
        if new is not None:
            return (b, new) if swap else (new, b)
    return p, g


def _structure_equal(p, g) -> bool:
    p, g = _same_shape(p, g)
    kp, kg = p[0], g[0]
    if kp == "one" and kg == "one":
        return _elem_equal(p[1], g[1])
    if kp in ("list", "set") and kg in ("list", "set"):
        named = _by_label(p[1], g[1])
        return named if named is not None else _unordered_equal(p[1], g[1], _elem_equal)
    if kp == "tup" and kg == "tup":
        if p[1:3] != g[1:3] or len(p[3]) != len(g[3]):
            return False
        named = _by_label(p[3], g[3])
        return named if named is not None else all(map(_elem_equal, p[3], g[3]))
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


_INF_SIGN = {("oo",): 1, ("neg", ("oo",)): -1}  # infinities compare only as bare +-oo


def _expr_equal(a, b) -> bool:
    if a == b:
        return True
    if _has_inf(a) or _has_inf(b):
        return _INF_SIGN.get(a) is not None and _INF_SIGN.get(a) == _INF_SIGN.get(b)
    qa, qb = _exact(a), _exact(b)
    if qa is not None and qb is not None:
        return qa == qb
    names = _symbols(a)
    if names != _symbols(b) or (_factored(b) and not _factored(a)):
        return False  # a is the answer, b the gold: see _factored
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

    A factored gold means the question asked for the factorization ("Factor ab+5b+2a+10"):
    the expanded form restates the question, and is wrong. A factored answer to an expanded
    gold is the same polynomial, and right: "the quotient of x^6 - 3 by x + 1" asks for a
    polynomial, not a form. (An "Expand ..." question then accepts the question restated,
    as the value test does for any unexpanded sum: the two answers alone cannot tell.)
    """
    while node[0] == "neg":
        node = node[1]
    bases = []
    for f in node[1] if node[0] == "mul" else (node,):
        base, exp = (f[1], _exact(f[2])) if f[0] == "pow" else (f, Fraction(1))
        if not _symbols(f):
            continue
        if exp is None or exp.denominator != 1 or exp < 1:
            return False  # a quotient or a root: not a factored polynomial
        bases += [base] * min(int(exp), 2)
    return len(bases) >= 2 and any(b[0] == "add" for b in bases)


def _equation_equal(p, g) -> bool:
    """Equations are equal when (lhs - rhs) of one is a nonzero constant times the other's."""
    dp, dg = (("add", (e[1], ("neg", e[2]))) for e in (p, g))
    names = _symbols(dp)
    if names != _symbols(dg):
        return False
    names = tuple(sorted(names))
    vp, vg = _values(dp, names), _values(dg, names)
    if vp is None or vg is None or any(abs(x) < 1e-25 for x in vp + vg):
        return False
    ratios = [x / y for x, y in zip(vp, vg)]
    return all(_close(r, ratios[0]) for r in ratios)


# ----------------------------------------------------------------------------- entry points


def rational(s: str) -> Fraction | None:
    """Exact value of one expression ("2 \\times 9", "\\frac{3}{4}", "10^{3}"), else None."""
    ast = _parse_expr(s)
    return None if ast is None else _exact(ast)


def as_string(s: str):
    """The structure of an answer compared as a string only (too long to parse)."""
    return ("one", ("raw", _squash(s)))


def answers_equal(pred, gold) -> bool:
    """Do two parse_answer structures say the same? (`gold` is the gold: see _factored.)"""
    _budget.deadline = time.monotonic() + SYMPY_SECONDS  # for all of its sympy proofs
    return _structure_equal(pred, gold)
