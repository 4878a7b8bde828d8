"""The reach query language: boolean expressions over user attributes, parsed by a real parser.

Public surface: ``parse_query``, ``Query``, ``QueryLimits``, ``evaluate``, ``attrs_of``.

Grammar (keywords ``and or not in`` are case-insensitive; ``and`` binds tighter than ``or``)::

    query  := or_ | "*"                          "*" (or an empty query) matches every user
    or_    := and_ ("or" and_)*
    and_   := unary ("and" unary)*
    unary  := "not" unary | atom
    atom   := "(" or_ ")"
            | NAME "=" VALUE | NAME "!=" VALUE
            | NAME "in" "(" VALUE ("," VALUE)* ")" | NAME "not" "in" "(" ... ")"
    NAME   := [A-Za-z_][A-Za-z0-9_.]*
    VALUE  := a bare word of letters, digits and ``_ . : + / -`` (so ``18-24``, ``65+``, ``US-CA``)
              or a quoted string ("..." or '...', no escapes)

A recursive-descent parser over a regex tokenizer; nothing is ever evaluated as Python. Sizes are
bounded (``QueryLimits``: characters, predicates, nesting depth, values in all ``in`` lists) and every
error is one line that starts with ``query:`` and names the column.

The tree is plain tuples: ``("in", attr, values)`` (``=`` is a one-value ``in``), ``("not", node)``,
``("and", nodes)``, ``("or", nodes)``, ``("all",)``. ``!=`` is ``not (attr = v)``: a user without the
attribute matches it. :func:`evaluate` runs a tree over columns of integer codes (one array per
attribute, code -1 where a user lacks it) with numpy, in one vectorized pass per predicate.

>>> q = parse_query("gender = F and age in (18-24, 25-34) and not geo = US-CA")
>>> q.tree[0], q.attrs
('and', ('age', 'gender', 'geo'))
>>> import numpy as np
>>> vocab = {"gender": {"F": 0, "M": 1}, "age": {"18-24": 0, "25-34": 1, "65+": 2}, "geo": {"US-CA": 0, "US-TX": 1}}
>>> cols = {"gender": np.array([0, 0, 1]), "age": np.array([1, 2, 1]), "geo": np.array([1, 1, 1])}
>>> evaluate(q.tree, cols, vocab).tolist()
[True, False, False]
>>> parse_query("age in (18-24")
Traceback (most recent call last):
...
loopline.errors.ConfigError: query: expected ',' or ')' at column 14 (end of query)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from loopline.errors import ConfigError

__all__ = ["parse_query", "Query", "QueryLimits", "evaluate", "attrs_of"]

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<op>!=|=|\(|\)|,|\*)
  | (?P<str>"[^"]*"|'[^']*')
  | (?P<word>[A-Za-z0-9_.:+/\-]+)
""", re.VERBOSE)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")
_KEYWORDS = {"and", "or", "not", "in"}


@dataclass(frozen=True)
class QueryLimits:
    """Bounds on one query; a query beyond them is refused with a one-line error."""

    max_chars: int = 4096  # length of the text
    max_predicates: int = 128  # attribute comparisons (each ``=``, ``!=`` or ``in``)
    max_depth: int = 32  # nesting of parentheses and ``not``
    max_values: int = 1024  # values in all ``in`` lists together


@dataclass(frozen=True)
class Query:
    """A parsed query: the text, its tree and the attributes it reads (sorted)."""

    text: str
    tree: tuple
    attrs: tuple


class _Parser:
    def __init__(self, text: str, limits: QueryLimits):
        self.text = text
        self.limits = limits
        self.toks: list[tuple[str, str, int]] = []  # (kind, text, column from 1)
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                self.fail(f"unexpected character {text[pos]!r}", pos + 1)
            kind = m.lastgroup
            if kind != "ws":
                tok = m.group()
                if kind == "word" and tok.lower() in _KEYWORDS:
                    kind, tok = "kw", tok.lower()
                elif kind == "str":
                    kind, tok = "word", tok[1:-1]
                self.toks.append((kind, tok, pos + 1))
            pos = m.end()
        self.i = 0
        self.predicates = 0
        self.values = 0

    def fail(self, msg: str, col: int | None = None):
        if col is None:
            col = self.toks[self.i][2] if self.i < len(self.toks) else len(self.text) + 1
        at_end = " (end of query)" if col > len(self.text) else ""
        raise ConfigError(f"query: {msg} at column {col}{at_end}")

    def peek(self) -> tuple[str, str, int] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def accept(self, kind: str, text: str | None = None) -> bool:
        t = self.peek()
        if t is not None and t[0] == kind and (text is None or t[1] == text):
            self.i += 1
            return True
        return False

    def parse(self) -> tuple:
        if not self.toks or (len(self.toks) == 1 and self.toks[0][1] == "*" and self.toks[0][0] == "op"):
            return ("all",)
        node = self.or_(0)
        if self.peek() is not None:
            self.fail(f"unexpected {self.peek()[1]!r}")
        return node

    def or_(self, depth: int) -> tuple:
        items = [self.and_(depth)]
        while self.accept("kw", "or"):
            items.append(self.and_(depth))
        return items[0] if len(items) == 1 else ("or", tuple(items))

    def and_(self, depth: int) -> tuple:
        items = [self.unary(depth)]
        while self.accept("kw", "and"):
            items.append(self.unary(depth))
        return items[0] if len(items) == 1 else ("and", tuple(items))

    def unary(self, depth: int) -> tuple:
        if depth >= self.limits.max_depth:
            self.fail(f"nested deeper than {self.limits.max_depth}")
        if self.accept("kw", "not"):
            return ("not", self.unary(depth + 1))
        return self.atom(depth)

    def atom(self, depth: int) -> tuple:
        t = self.peek()
        if t is None:
            self.fail("expected an attribute, 'not' or '('")
        if t[0] == "op" and t[1] == "(":
            self.i += 1
            node = self.or_(depth + 1)
            if not self.accept("op", ")"):
                self.fail("expected ')'")
            return node
        if t[0] != "word" or not _NAME.match(t[1]):
            self.fail(f"expected an attribute name, got {t[1]!r}")
        attr = t[1]
        self.i += 1
        self.predicates += 1
        if self.predicates > self.limits.max_predicates:
            self.fail(f"more than {self.limits.max_predicates} comparisons", t[2])
        if self.accept("op", "="):
            return ("in", attr, (self.value(),))
        if self.accept("op", "!="):
            return ("not", ("in", attr, (self.value(),)))
        negate = self.accept("kw", "not")
        if not self.accept("kw", "in"):
            self.fail(f"expected '=', '!=' or 'in' after {attr!r}")
        if not self.accept("op", "("):
            self.fail("expected '(' after 'in'")
        values = [self.value()]
        while not self.accept("op", ")"):
            if not self.accept("op", ","):
                self.fail("expected ',' or ')'")
            values.append(self.value())
        node = ("in", attr, tuple(dict.fromkeys(values)))
        return ("not", node) if negate else node

    def value(self) -> str:
        t = self.peek()
        if t is None or t[0] != "word":
            self.fail("expected a value" + (f", got {t[1]!r}" if t is not None else ""))
        self.i += 1
        self.values += 1
        if self.values > self.limits.max_values:
            self.fail(f"more than {self.limits.max_values} values", t[2])
        return t[1]


def attrs_of(node: tuple, out: set | None = None) -> set:
    """The attribute names a parsed (sub)tree reads."""
    out = set() if out is None else out
    if node[0] == "in":
        out.add(node[1])
    elif node[0] == "not":
        attrs_of(node[1], out)
    elif node[0] in ("and", "or"):
        for n in node[1]:
            attrs_of(n, out)
    return out


def parse_query(text: str, limits: QueryLimits = QueryLimits()) -> Query:
    """Parse ``text``; raise :class:`~loopline.errors.ConfigError` (``query: ...``) if it is not
    a valid, bounded query."""
    if not isinstance(text, str):
        raise ConfigError(f"query: must be text, got {type(text).__name__}")
    if len(text) > limits.max_chars:
        raise ConfigError(f"query: longer than {limits.max_chars} characters ({len(text)})")
    tree = _Parser(text, limits).parse()
    return Query(text, tree, tuple(sorted(attrs_of(tree))))


def evaluate(tree: tuple, cols, vocab: dict) -> np.ndarray:
    """The boolean mask of the rows a tree matches. ``cols[attr]`` is an integer array of value codes
    (-1: no value), ``vocab[attr]`` maps a value to its code; every column has the same length, and
    ``cols`` also answers ``len(cols)`` through any column (a row count is taken from the first)."""
    n = len(next(iter(cols.values()))) if cols else 0
    return _eval(tree, cols, vocab, n)


def _eval(node: tuple, cols, vocab: dict, n: int) -> np.ndarray:
    kind = node[0]
    if kind == "in":
        col = cols.get(node[1]) if hasattr(cols, "get") else cols[node[1]]
        codes = [c for c in (vocab.get(node[1], {}).get(v) for v in node[2]) if c is not None]
        if col is None or not codes:
            return np.zeros(n, dtype=bool)
        if len(codes) == 1:
            return col == codes[0]
        # a gather beats np.isin: one slot per code of the vocabulary, and a last one (False) that code
        # -1 (missing) and any code past the vocabulary land on
        lut = np.zeros(max(len(vocab[node[1]]), max(codes) + 1) + 1, dtype=bool)
        lut[codes] = True
        return lut[np.clip(col, -1, len(lut) - 1)]
    if kind == "not":
        return ~_eval(node[1], cols, vocab, n)
    if kind == "and":
        out = _eval(node[1][0], cols, vocab, n)
        for sub in node[1][1:]:
            out &= _eval(sub, cols, vocab, n)
        return out
    if kind == "or":
        out = _eval(node[1][0], cols, vocab, n)
        for sub in node[1][1:]:
            out |= _eval(sub, cols, vocab, n)
        return out
    if kind == "all":
        return np.ones(n, dtype=bool)
    raise ValueError(f"unknown query node {kind!r}")
