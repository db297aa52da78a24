"""The GSM8K verifier: reads worked solutions the way GSM8K writes them and checks them.

It recomputes every equation it can parse (units between numbers, `x`/`×`/`*`/`÷`, `%`,
fractions, `$1,200.50`, negative numbers, parentheses, running totals, `<<a*b=c>>`
calculator annotations) and checks that the reasoning ends on the answer: the value of its
last equation, or a final stated number that the reasoning computed. What it cannot parse it
skips rather than rejects; wrong arithmetic it can parse and a wrong final value it rejects.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction

from plugins.tasks.gsm8k_numbers import (
    CALC_RE,
    canonical_number,
    last_marker,
    numbers_in,
    to_fraction,
)

# --- expressions in prose ---------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
    r"|(?P<word>[A-Za-z]+(?:['’][A-Za-z]+)*)|(?P<op>[-+*/×÷^·−–])|(?P<pct>%)"
    r"|(?P<cur>[$€£])|(?P<lp>[(\[])|(?P<rp>[)\]])|(?P<eq>=)|(?P<other>\S)"
)
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "^": 3}
_OP_CHAR = {"×": "*", "·": "*", "÷": "/", "−": "-", "–": "-"}
_OP_WORD = {"x": "*", "times": "*", "plus": "+", "minus": "-"}
# Words after a number that end its unit ("5 apples and 3 ...") rather than extend it.
_STOP = frozenset("so then is are was were which that than equals".split())
_SUFFIXES = frozenset(
    "k m h g km kg cm mm ml lb lbs oz ft mi yd hr hrs min mins sec mph am pm".split()
)
_FILLER = frozenset(("a", "an", "the", "of", "per", "each"))
# Bounds that keep a pathological line (a wall of `=` or of parentheses) cheap to read.
_MAX_TOKENS, _MAX_DEPTH = 80, 12
# Unit conversions a line may state as an equation ("1/2 hour = 30 minutes").
_CONVERSIONS = frozenset(Fraction(n) for n in (60, 3600, 24, 7, 12, 52, 365, 100, 1000, 16))


@dataclass(frozen=True, slots=True)
class _Lit:
    value: Fraction
    pct: bool
    decimals: int
    clock: bool = False  # `10:30` read as 10.5 hours


@dataclass(frozen=True, slots=True)
class _Bin:
    op: str
    left: _Lit | _Bin | _Neg
    right: _Lit | _Bin | _Neg


@dataclass(frozen=True, slots=True)
class _Neg:
    arg: _Lit | _Bin | _Neg


_Node = _Lit | _Bin | _Neg


def _value(node: _Node, mode: str) -> Fraction:
    """The value of node read in `mode`: `frac` reads 20% as 0.2; `plain` reads it as 20 (a
    number written with its % sign, "= 60%"); `hundred` reads only `x 100%` as x 100 ("12/20 x
    100% = 60%"); `rel` also reads `a - 20%` as a * 0.8."""
    if isinstance(node, _Lit):
        if not node.pct or mode == "plain" or mode == "hundred" and node.value == 100:
            return node.value
        return node.value / 100
    if isinstance(node, _Neg):
        return -_value(node.arg, mode)
    a = _value(node.left, mode)
    if mode == "rel" and node.op in "+-" and isinstance(node.right, _Lit) and node.right.pct:
        share = node.right.value / 100
        return a * (1 + share if node.op == "+" else 1 - share)
    b = _value(node.right, mode)
    if node.op == "^":
        if b.denominator != 1 or abs(b) > 12:
            raise ValueError("exponent")
        return a**b.numerator
    if node.op == "/" and b == 0:
        raise ZeroDivisionError
    ops: dict[str, Callable[[Fraction, Fraction], Fraction]] = {
        "+": operator.add,
        "-": operator.sub,
        "*": operator.mul,
        "/": operator.truediv,
    }
    return ops[node.op](a, b)


def _leaves(node: _Node) -> Iterator[_Lit]:
    if isinstance(node, _Lit):
        yield node
    elif isinstance(node, _Neg):
        yield from _leaves(node.arg)
    else:
        yield from _leaves(node.left)
        yield from _leaves(node.right)


def _has_pct(node: _Node) -> bool:
    return any(leaf.pct for leaf in _leaves(node))


def _lead(node: _Node) -> _Node:
    while isinstance(node, _Bin):
        node = node.left
    return node


@dataclass(frozen=True, slots=True)
class _Side:
    node: _Node
    start: int  # token indexes
    end: int
    unit: str | None  # first unit word after the last number ("sheep", "hours")

    @property
    def literal(self) -> bool:
        return isinstance(self.node, _Lit) or (
            isinstance(self.node, _Neg) and isinstance(self.node.arg, _Lit)
        )

    def values(self) -> dict[str, Fraction]:
        """Its value per percent reading (one reading when it has no `%`)."""
        if not _has_pct(self.node):
            return {"frac": _value(self.node, "frac")}
        modes = ("frac", "plain") if self.literal else ("frac", "hundred", "rel")
        return {m: _value(self.node, m) for m in modes}

    def tolerance(self, mode: str) -> Fraction:
        """Half a unit of its last written digit when it is a single number (10/3 = 3.33)."""
        if not self.literal:
            return Fraction(0)
        lit = self.node if isinstance(self.node, _Lit) else getattr(self.node, "arg", None)
        assert isinstance(lit, _Lit)
        tol = Fraction(5, 10 ** (lit.decimals + 1))
        return tol / 100 if lit.pct and mode != "plain" else tol


class _Line:
    """Tokens of one line and a small precedence parser for the arithmetic written in it."""

    def __init__(self, text: str, *, flat: bool = False) -> None:
        self.text = text
        self.flat = flat  # read `2 + 3 * 4` left to right, as a running calculation
        self.depth = 0  # parentheses open while parsing
        self.t = [
            (m.lastgroup or "", m.group(), m.start(), m.end()) for m in _TOKEN_RE.finditer(text)
        ]

    def kind(self, i: int) -> str:
        return self.t[i][0] if 0 <= i < len(self.t) else ""

    def word(self, i: int) -> str:
        return self.t[i][1].lower() if 0 <= i < len(self.t) else ""

    def glued(self, i: int) -> bool:
        """Token i touches token i + 1 (no space between)."""
        return 0 <= i < len(self.t) - 1 and self.t[i][3] == self.t[i + 1][2]

    def x_op(self, i: int) -> bool:
        """Word i is an `x` between two numbers (`12 x 2`, `12x2`, `(3+4) x 2`, `4 x $3`)."""
        return (
            self.word(i) == "x"
            and self.kind(i - 1) in ("num", "rp", "pct")
            and self.kind(i + 1) in ("num", "cur", "lp")
        )

    def suffix(self, i: int) -> bool:
        """Word i is a unit written onto the number before it (`$280k`, `5km`, `2h`)."""
        return self.word(i) in _SUFFIXES and self.kind(i - 1) == "num" and self.glued(i - 1)

    def tainted(self, i: int) -> bool:
        """A number written into a word or variable (`3x`, `2nd`, `A1`): not arithmetic."""
        if self.kind(i - 1) == "word" and self.glued(i - 1) and not self.x_op(i - 1):
            return True
        return (
            self.kind(i + 1) == "word"
            and self.glued(i)
            and not (self.x_op(i + 1) or self.suffix(i + 1))
        )

    def var_word(self, i: int) -> bool:
        return self.kind(i) == "word" and len(self.word(i)) == 1 and self.word(i) != "a"

    def starts_term(self, i: int) -> bool:
        k = self.kind(i)
        if k == "num":
            return not self.tainted(i)
        if k == "cur":
            return self.kind(i + 1) == "num" and not self.tainted(i + 1)
        if k == "op" and self.t[i][1] in "-−+":
            return self.glued(i) and self.kind(i + 1) in ("num", "cur", "lp")
        return k == "lp"

    def binop(self, i: int, left: _Node) -> tuple[str, int] | None:
        """The operator at token i joining `left` to a following term, and where that starts."""
        k, w = self.kind(i), self.word(i)
        if k == "op" and not (w == "/" and self.kind(i + 1) == "word"):
            op, j = _OP_CHAR.get(w, w), i + 1
            if op == "-" and self.glued(i - 1) and self.glued(i) and self._range(left, j):
                return None  # "pages 12-15": a range, not a subtraction
        elif k == "word" and w in _OP_WORD:
            op, j = _OP_WORD[w], i + 1
        elif (
            k == "word"
            and w == "of"
            and (isinstance(left, _Lit) and left.pct or isinstance(left, _Bin) and left.op == "/")
        ):
            op, j = "*", i + 1  # "20% of 80", "3/4 of 20"
        elif k == "word" and w in ("divided", "multiplied") and self.word(i + 1) == "by":
            op, j = ("/" if w == "divided" else "*"), i + 2
        else:
            return None
        return (op, j) if op in _PREC and self.starts_term(j) else None

    def _range(self, left: _Node, j: int) -> bool:
        nxt = to_fraction(self.t[j][1]) if self.kind(j) == "num" else None
        return isinstance(left, _Lit) and nxt is not None and 0 <= left.value < nxt

    def units(self, i: int, left: _Node) -> tuple[int, str | None]:
        """Skip up to five unit words after a number ("sheep", "per hour", "/hour")."""
        unit, n = None, 0
        while n < 5:
            if self.kind(i) == "op" and self.word(i) == "/" and self.kind(i + 1) == "word":
                i, n = i + 2, n + 1  # `$10/hour`: a rate, not a division
                continue
            if self.kind(i) == "cur" and self.glued(i - 1) and not self.glued(i):
                i += 1  # `30$`
                continue
            w = self.word(i)
            if (
                self.kind(i) != "word"
                or w in _STOP
                or self.var_word(i)
                or w in _OP_WORD
                and self.starts_term(i + 1)
                or w in ("of", "divided", "multiplied")
                and self.binop(i, _Bin("/", left, left))
            ):
                break
            if unit is None and w not in _FILLER:
                unit = w.rstrip("s") if len(w) > 3 else w
            i, n = i + 1, n + 1
        return i, unit

    def atom(self, i: int) -> tuple[_Node, int, str | None] | None:
        """A number or a parenthesised expression, with the unit words after it."""
        suffix = None
        if self.kind(i) == "lp":
            self.depth += 1
            inner = self.expr(i + 1) if self.depth <= _MAX_DEPTH else None
            self.depth -= 1
            if inner is None or self.kind(inner[1]) != "rp":
                return None
            node: _Node = inner[0]
            i = inner[1] + 1
        else:
            found = self.number(i)
            if found is None:
                return None
            node, i = found
            if self.suffix(i - 1):
                suffix = self.word(i - 1)
        i, unit = self.units(i, node)
        return node, i, unit or suffix

    def number(self, i: int) -> tuple[_Lit, int] | None:
        """`$1,200.50`, `2 1/2`, `60%`, `10:30`, `280k` starting at token i."""
        if self.kind(i) == "cur":
            i += 1
        if self.kind(i) != "num" or self.tainted(i):
            return None
        text = self.t[i][1].replace(",", "")
        value, decimals = Fraction(text), len(text.split(".")[1]) if "." in text else 0
        i += 1
        if decimals == 0 and self.kind(i) == "num" and self.word(i + 1) == "/":
            b, c = (
                to_fraction(self.t[i][1]),
                to_fraction(self.t[i + 2][1] if i + 2 < len(self.t) else ""),
            )
            if b is not None and c is not None and 0 < b < c and c.denominator == 1:
                if self.glued(i) and self.glued(i + 1) and b.denominator == 1:
                    value, i = value + b / c, i + 3  # a mixed number, "2 1/2"
        clock = decimals == 0 and self.ratio_at(i)
        clock = clock and re.fullmatch(r"[0-5]\d", self.t[i + 1][1]) is not None
        if clock:  # "18 - 8 = 10:00 am"
            value, i = value + Fraction(int(self.t[i + 1][1]), 60), i + 2
        i += self.suffix(i)
        pct = self.kind(i) == "pct" or self.word(i) == "percent"
        return _Lit(value, pct, decimals, clock), i + pct

    def unary(self, i: int) -> tuple[_Node, int, str | None] | None:
        if self.kind(i) == "op" and self.t[i][1] in "-−+" and self.starts_term(i):
            inner = self.unary(i + 1)
            if inner is None:
                return None
            return (_Neg(inner[0]) if self.t[i][1] != "+" else inner[0]), inner[1], inner[2]
        return self.atom(i)

    def expr(self, i: int, min_prec: int = 1) -> tuple[_Node, int, str | None] | None:
        first = self.unary(i)
        if first is None:
            return None
        node, i, unit = first
        while (found := self.binop(i, node)) is not None:
            op, j = found
            prec = 1 if self.flat and op != "^" else _PREC[op]
            if prec < min_prec:
                break
            rhs = self.expr(j, prec + (op != "^"))
            if rhs is None:
                break
            node, i, unit = _Bin(op, node, rhs[0]), rhs[1], rhs[2] or unit
        return node, i, unit

    def ratio_at(self, i: int) -> bool:
        """Token i is the `:` of a ratio or a clock time (`3:2`, `8:30`)."""
        return self.word(i) == ":" and self.glued(i - 1) and self.glued(i)

    def tail(self, lo: int, eq: int) -> _Side | None:
        """The longest expression that ends right before the `=` at eq; None if none or if
        it continues to the left (`S + 143 =`: an equation in an unknown)."""
        for s in range(max(lo, eq - _MAX_TOKENS), eq):
            if not self.starts_term(s) or (found := self.expr(s)) is None or found[1] != eq:
                continue
            prev = self.kind(s - 1)
            if s > lo and (
                prev in ("op", "pct")
                or self.var_word(s - 1)
                or self.ratio_at(s - 1)
                or prev in ("num", "rp")
                and self.glued(s - 1)
                or prev == "num"
                and self.tainted(s - 1)
            ):
                return None
            return _Side(found[0], s, eq, found[2])
        return None

    def head(self, b: int) -> _Side | None:
        """The expression right after an `=`; None if none or if it runs into an unknown."""
        if not self.starts_term(b) or (found := self.expr(b)) is None:
            return None
        j = found[1]
        if (
            self.kind(j) == "lp"
            or self.ratio_at(j)
            or self.kind(j) == "op"
            and (self.kind(j + 1) == "lp" or self.var_word(j + 1) or self.tainted(j + 1))
        ):
            return None
        return _Side(found[0], b, j, found[2])


def _agree(left: _Side, right: _Side) -> Fraction | None:
    """The value both sides have under some reading of their `%`, rounding, floor/ceil or a
    unit conversion; None when they disagree."""
    lv, rv = left.values(), right.values()
    for lm, a in lv.items():
        for rm, b in rv.items():
            if abs(a - b) <= left.tolerance(lm) + right.tolerance(rm):
                return b
    # "25/3 = 8 full boxes": a whole count written for a fraction of one.
    if right.literal and isinstance(right.node, _Lit) and right.node.decimals == 0:
        b = rv["frac"]
        if any(a.denominator != 1 and b in (math.floor(a), math.ceil(a)) for a in lv.values()):
            return b
    a, b = lv["frac"], rv["frac"]
    if any(leaf.clock for side in (left, right) for leaf in _leaves(side.node)):
        if (a - b) % 12 == 0:  # "8:00 pm + 5 hours = 1:00 am"
            return b
    if left.unit and right.unit and left.unit != right.unit and a and b:
        if max(a / b, b / a) in _CONVERSIONS:
            return b
    return None


@dataclass
class ReasoningCheck:
    """What the verifier read in a reasoning: equations, wrong ones, values they produce."""

    text: str  # the reasoning with calculator annotations resolved
    equations: int = 0
    wrong: list[str] = field(default_factory=list)
    results: set[Fraction] = field(default_factory=set)  # values the equations establish
    finals: list[tuple[int, int, Fraction]] = field(default_factory=list)  # (start, end, value)


def _check_line(line: str, offset: int, out: ReasoningCheck) -> None:
    p = _Line(line)
    eqs = [i for i, t in enumerate(p.t) if t[0] == "eq"]
    for n, e in enumerate(eqs):
        lo = eqs[n - 1] + 1 if n else 0
        left, right = p.tail(lo, e), p.head(e + 1)
        if right is None or p.kind(e - 1) == "op" or p.kind(e + 1) == "eq":
            continue
        if left is None:
            # "19 green and pink hats + 24 hats = 43": a sum it cannot read is still the
            # value the sentence computes (not a bare "Total = 43").
            if right.literal and any(p.kind(i) == "op" for i in range(lo, e)):
                value = right.values().get("plain", right.values()["frac"])
                out.results.add(value)
                out.finals.append((offset + p.t[e][2], offset + p.t[right.end - 1][3], value))
            continue
        try:
            agreed = _agree(left, right)
            if agreed is None and not (left.literal and right.literal):
                # "2 + 3 x 4 = 20": written as a running calculation, left to right.
                flat = _Line(line, flat=True)
                fl, fr = flat.tail(left.start, e), flat.head(e + 1)
                agreed = _agree(fl, fr) if fl is not None and fr is not None else None
            lead = _lead(right.node)
            if agreed is None and left.literal and right.literal:
                out.results.add(right.values()["frac"])  # "2 dozen = 24": stated, not computed
                continue
            # A running total, "5 * 4 = 20 + 3 = 23", checks 5 * 4 = 20.
            if agreed is None and isinstance(lead, _Lit) and not right.literal and not lead.pct:
                if left.values()["frac"] == lead.value:
                    out.equations += 1
                    out.results |= {lead.value, right.values()["frac"]}
                    continue
        except (ValueError, ZeroDivisionError, OverflowError):
            continue
        # Two numbers that agree ("0.25 = 25%", "1 hour = 60 minutes") restate, not compute.
        out.equations += not (left.literal and right.literal)
        if agreed is None:
            out.wrong.append(line[p.t[left.start][2] : p.t[right.end - 1][3]].strip())
            continue
        shown = right.values().get("plain", agreed) if right.literal else agreed
        out.results |= {agreed, shown, *left.values().values()}
        out.finals.append((offset + p.t[left.start][2], offset + p.t[right.end - 1][3], shown))


def _ast_value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _ast_value(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _ast_value(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "^"}.get(
            type(node.op)
        )
        if op is not None:
            a, b = _ast_value(node.left), _ast_value(node.right)
            return _value(_Bin(op, _Lit(a, False, 0), _Lit(b, False, 0)), "frac")
    raise ValueError("not arithmetic")


def resolve_annotations(text: str) -> str:
    """Text without `<<a*b=c>>` annotations; where the text does not show the computation
    (`He gets <<3*4=12>>12 a day`), the expression stays in ("He gets 3*4 = 12 a day")."""

    def repl(m: re.Match[str]) -> str:
        before = text[: m.start()].rstrip()
        if not before or re.search(r"(?:[=+\-*/×÷(]|\sx)$", before):
            return m.group(1)
        return f"{m.group(2).strip().replace('**', '^')} = {m.group(1)}"

    return CALC_RE.sub(repl, text)


def check_reasoning(reasoning: str) -> ReasoningCheck:
    """Check every calculator annotation and every equation the prose states."""
    out = ReasoningCheck(resolve_annotations(reasoning))
    for m in CALC_RE.finditer(reasoning):
        rhs = to_fraction(m.group(3))
        try:
            value = _ast_value(ast.parse(m.group(2).strip(), mode="eval"))
        except (SyntaxError, ValueError, ZeroDivisionError, OverflowError):
            continue
        if rhs is None:
            continue
        decimals = len(m.group(3).split(".")[1].strip()) if "." in m.group(3) else 0
        right = _Side(_Lit(rhs, False, decimals), 0, 0, None)
        out.equations += 1
        if _agree(_Side(_Lit(value, False, 99), 0, 0, None), right) is None:
            out.wrong.append(m.group(0))
            continue
        out.results |= {value, rhs}
        after = numbers_in(reasoning[m.end() : m.end() + 24].split(" ", 1)[0], words=False)
        if (
            after
            and after[0][0] == 0
            and _agree(right, _Side(_Lit(after[0][1], False, 0), 0, 0, None)) is None
        ):
            out.wrong.append(f"{m.group(0)} then {after[0][1]}")
    offset = 0
    for line in out.text.split("\n"):
        _check_line(line, offset, out)
        offset += len(line) + 1
    return out


def check_equations(reasoning: str) -> tuple[int, bool]:
    """(number of equations checked, whether all of them are right)."""
    found = check_reasoning(reasoning)
    return found.equations, not found.wrong


_SENTENCE_RE = re.compile(r"(?:[^\n.!?]|[.!?](?=[^\s.!?]))+")


def _final_values(body: str, chk: ReasoningCheck) -> set[Fraction]:
    """What the reasoning ends on: in its last sentence that holds a number, the value of the
    last equation (or a computed value stated after it), else the last number when the
    reasoning computed it (a number it only copied proves nothing)."""
    for sent in reversed(list(_SENTENCE_RE.finditer(body))):
        nums = [(sent.start() + p, v) for p, v in numbers_in(sent.group())]
        if nums:
            break
    else:
        return set()
    # "28 / 12 = 2.33 cartons, so he opened 3": a computed value rounded to a whole one.
    computed = chk.results | {
        Fraction(f(r)) for r in chk.results if r.denominator != 1 for f in (math.floor, math.ceil)
    }
    inside = [f for f in chk.finals if sent.start() <= f[0] < sent.end()]
    if inside:
        _, end, value = inside[-1]
        after = {v for p, v in nums if p >= end}
        return {value} | {v for v in after if v in computed or _converts(v, {value})}
    known = set(computed)
    last = nums[-1][1]
    before = [value for start, _, value in chk.finals if start < sent.start()]
    # "2 * 60 = 120 minutes. So it is 2 hours.": the last result restated in another unit.
    if _converts(last, ({v for _, v in nums[:-1]} & known) | set(before[-1:])):
        known.add(last)
    return {last} & known


def _converts(value: Fraction, others: set[Fraction]) -> bool:
    """value restates one of others in another unit ("4200 cents, which is $42")."""
    return any(v and value and max(v / value, value / v) in _CONVERSIONS for v in others)


def verify_reasoning(reasoning: str, answer: str) -> tuple[bool, str]:
    """(accepted, why): every equation right, at least one, and the reasoning ends on answer."""
    gold = to_fraction(canonical_number(answer) or "")
    if gold is None:
        return False, f"answer {answer!r} has no number"
    chk = check_reasoning(reasoning)
    if chk.wrong:
        return False, f"wrong arithmetic: {chk.wrong[0]!r}"
    if not chk.equations:
        return False, "no equation to check"
    stated, at = last_marker(chk.text)
    if stated is not None and to_fraction(stated) != gold:
        return False, f"states {stated}, not {answer}"
    finals = _final_values(chk.text[:at], chk)
    if gold not in finals:
        got = ", ".join(f"{float(v):g}" for v in sorted(finals))
        return False, f"ends on {got or 'no computed number'}, not {answer}"
    return True, "ok"


def with_a_wrong_result(answer_field: str) -> Iterator[str]:
    """The answer field once per calculator annotation, that one's result (and the number the
    text shows after it) one more than it should be: what the verifier must reject."""
    for m in re.finditer(r"<<([^<>=]*)=([^<>]*)>>([\d,]*\.?\d*)", answer_field):
        value = to_fraction(m.group(2))
        if value is None:
            continue
        bad = value + 1
        shown = str(bad.numerator) if bad.denominator == 1 else f"{float(bad):g}"
        head, tail = answer_field[: m.start()], answer_field[m.end() :]
        yield f"{head}<<{m.group(1)}={shown}>>{shown}{tail}"
