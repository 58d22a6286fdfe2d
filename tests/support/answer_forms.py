"""Pairs of a reference answer and a second form of it, generated with sympy, for the differential grading test.

Each `Pair` has a category, the reference (gold) and the answer a model might box, and whether the two are
meant to be equivalent. Equivalent forms come from sympy's own rewrites (expand/factor, together/apart,
radsimp, radical and log/exp identities) or from notation (interval spacing, reordered sets, matrix
environments, degrees and percentages); non-equivalent ones change one thing (a coefficient, a bracket, a
set element, the order of a tuple, a matrix entry). Whether math-verify agrees is not assumed here: the test
compares what the reward server says with what math-verify says in a plain process.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp

x, y = sp.symbols("x y")


@dataclass(frozen=True)
class Pair:
    category: str
    reference: str
    answer: str
    equivalent: bool


def _tex(expr: sp.Basic) -> str:
    return sp.latex(expr)


def _nonzero(rng: random.Random, lo: int = -6, hi: int = 6) -> int:
    return rng.choice([k for k in range(lo, hi + 1) if k != 0])


def _poly_factored(rng: random.Random) -> sp.Expr:
    factors = [x + _nonzero(rng) for _ in range(rng.randint(2, 3))]
    return sp.Mul(*factors, evaluate=False) * _nonzero(rng, 1, 3)


def expand_factor(rng: random.Random) -> tuple[str, str, str]:
    factored = _poly_factored(rng)
    expanded = sp.expand(factored)
    wrong = expanded + _nonzero(rng, 1, 4) * x ** rng.randint(0, 2)
    pair = [_tex(sp.factor(expanded)), _tex(expanded)]
    rng.shuffle(pair)
    return pair[0], pair[1], _tex(wrong)


def together_apart(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample([k for k in range(-5, 6) if k != 0], 2)
    p, q = _nonzero(rng, 1, 5), _nonzero(rng, -5, 5)
    expr = p / (x + a) + q / (x + b)
    together = sp.factor(sp.together(expr))
    wrong = p / (x + a) - q / (x + b)
    pair = [_tex(together), _tex(sp.apart(together, x))]
    rng.shuffle(pair)
    return pair[0], pair[1], _tex(sp.factor(sp.together(wrong)))


def _signed(term: str, coef: int) -> str:
    """` + 2\\sqrt{3}` / ` - \\sqrt{3}`: a term with its sign, as a person writes it."""
    magnitude = "" if abs(coef) == 1 else str(abs(coef))
    return f" {'+' if coef > 0 else '-'} {magnitude}{term}"


def rationalised(rng: random.Random) -> tuple[str, str, str]:
    c = rng.choice([2, 3, 5, 6, 7, 10, 11, 13])
    a = rng.randint(1, 9)
    b = rng.choice([1, -1, 2, -2, 3])
    if a * a == b * b * c:
        a += 1
    num = rng.randint(1, 7)
    root = f"\\sqrt{{{c}}}"
    raw = f"\\frac{{{num}}}{{{a}{_signed(root, b)}}}"
    clean = sp.radsimp(num / (a + b * sp.sqrt(c)))
    wrong = sp.radsimp(num / (a - b * sp.sqrt(c)))
    return _tex(clean), raw, _tex(wrong)


def radicals(rng: random.Random) -> tuple[str, str, str]:
    k = rng.randint(2, 15)
    m = rng.choice([2, 3, 5, 6, 7, 10, 11, 13, 14, 15])
    n = k * k * m
    coef = rng.randint(1, 5)
    simplified = coef * k * sp.sqrt(m)
    raw = f"{coef if coef > 1 else ''}\\sqrt{{{n}}}"
    wrong = f"{coef if coef > 1 else ''}\\sqrt{{{n + k}}}"
    return _tex(simplified), raw, wrong


def log_exp(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.randrange(5)
    a, b = rng.sample(range(2, 14), 2)
    k = rng.randint(2, 6)
    if kind == 0:  # log(a^k) = k log a
        return f"{k}\\log {a}", f"\\log({a ** k})", f"\\log({a ** k + 1})"
    if kind == 1:  # log a + log b = log(ab)
        return f"\\log({a * b})", f"\\log {a} + \\log {b}", f"\\log {a} - \\log {b}"
    if kind == 2:  # e^{a+b} = e^a e^b
        return f"e^{{{a + b}}}", f"e^{{{a}}} e^{{{b}}}", f"e^{{{a}}} + e^{{{b}}}"
    if kind == 3:  # ln(e^k x) = k + ln x
        return f"{k} + \\ln {a}", f"\\ln({a} e^{{{k}}})", f"\\ln({a} e^{{{k + 1}}})"
    return f"x^{{{k}}}", f"e^{{{k}\\ln x}}", f"e^{{{k + 1}\\ln x}}"  # exp(k log x) = x^k


def intervals(rng: random.Random) -> tuple[str, str, str]:
    lo: int | str = rng.randint(-9, 5)
    hi: int | str = lo + rng.randint(1, 9)
    left, right = rng.choice("(["), rng.choice(")]")
    if rng.random() < 0.2:
        lo, left = "-\\infty", "("
    elif rng.random() < 0.2:
        hi, right = "\\infty", ")"
    space = [rng.choice(["", " ", "  "]) for _ in range(3)]
    reference = f"{left}{lo},{hi}{right}"
    answer = f"{left}{space[0]}{lo}{space[1]},{space[2]}{hi}{right}"
    if rng.random() < 0.3:
        answer = f"\\left{left} {lo}, {hi} \\right{right}"
    if lo == "-\\infty":
        wrong = f"({lo}, {hi}{')' if right == ']' else ']'}"
    else:
        wrong = ("[" if left == "(" else "(") + f"{lo}, {hi}" + right
    return reference, answer, wrong


def sets_reordered(rng: random.Random) -> tuple[str, str, str]:
    elems = rng.sample(range(-12, 13), rng.randint(3, 5))
    shuffled = elems[:]
    while shuffled == elems:
        rng.shuffle(shuffled)
    other = elems[:-1] + [max(elems) + 1]
    body = ", ".join
    return (f"\\{{{body(map(str, elems))}\\}}", f"\\{{{body(map(str, shuffled))}\\}}",
            f"\\{{{body(map(str, other))}\\}}")


def tuples(rng: random.Random) -> tuple[str, str, str]:
    values = {sp.Rational(n, d) for n in range(1, 10) for d in (1, 2, 4, 5)}
    elems = rng.sample(sorted(values), rng.randint(2, 3))
    as_decimal = [str(float(e)) if e.q != 1 else str(e) for e in elems]
    reordered = elems[::-1]
    return (f"\\left({', '.join(_tex(e) for e in elems)}\\right)", f"({', '.join(as_decimal)})",
            f"({', '.join(_tex(e) for e in reordered)})")


def matrices(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(2, 3)
    m = sp.Matrix(n, n, lambda i, j: sp.Rational(rng.randint(-9, 9), rng.choice([1, 2, 4])))
    env = rng.choice(["pmatrix", "bmatrix"])

    def write(mat: sp.Matrix, entry: Callable[[sp.Rational], str]) -> str:
        rows = " \\\\ ".join(" & ".join(entry(mat[i, j]) for j in range(n)) for i in range(n))
        return f"\\begin{{{env}}} {rows} \\end{{{env}}}"

    wrong = m.copy()
    wrong[rng.randrange(n), rng.randrange(n)] += 1
    return write(m, _tex), write(m, lambda e: str(float(e)) if e.q != 1 else str(e)), write(wrong, _tex)


def degrees_percent(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.randrange(3)
    v = rng.randint(1, 179)
    if kind == 0:
        return f"{v}^\\circ", str(v), str(v + 1)
    if kind == 1:
        return str(v), f"{v}^{{\\circ}}", f"{v + 1}^\\circ"
    p = rng.randint(1, 99)
    return f"{p}\\%", rng.choice([str(p), f"\\frac{{{p}}}{{100}}"]), f"{p + 1}\\%"


MAKERS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "expand_factor": expand_factor, "together_apart": together_apart, "rationalised": rationalised,
    "radicals": radicals, "log_exp": log_exp, "intervals": intervals, "sets_reordered": sets_reordered,
    "tuples": tuples, "matrices": matrices, "degrees_percent": degrees_percent,
}


def generate(per_category: int, seed: int = 0) -> list[Pair]:
    """`per_category` equivalent and as many non-equivalent pairs of each category, without repeats."""
    rng = random.Random(seed)
    pairs: list[Pair] = []
    for name, make in MAKERS.items():
        seen: set[tuple[str, str]] = set()
        count = {True: 0, False: 0}
        for _ in range(50 * per_category):
            if min(count.values()) >= per_category:
                break
            reference, same, other = make(rng)
            for answer, equivalent in ((same, True), (other, False)):
                if answer != reference and (reference, answer) not in seen and count[equivalent] < per_category:
                    seen.add((reference, answer))
                    count[equivalent] += 1
                    pairs.append(Pair(name, reference, answer, equivalent))
    return pairs
