"""Property-based fuzzing of the reach query parser: any text is a query or a one-line ``query:`` error,
and a query built from the grammar parses and evaluates to the same mask as a direct Python reading."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loopline.errors import ConfigError
from loopline.state.reach_query import evaluate, parse_query

pytestmark = pytest.mark.fuzz

VOCAB = {"age": {"18-24": 0, "25-34": 1, "65+": 2}, "geo": {"US-CA": 0, "US-TX": 1}, "gender": {"F": 0, "M": 1}}
ROWS = [{"age": a, "geo": g, "gender": s} for a in (None, "18-24", "25-34", "65+") for g in (None, "US-CA", "US-TX")
        for s in (None, "F", "M")]
COLS = {k: np.array([VOCAB[k][r[k]] if r[k] is not None else -1 for r in ROWS]) for k in VOCAB}
TOKENS = ["and", "or", "not", "in", "(", ")", ",", "=", "!=", "*", "age", "geo", "gender", "18-24", "US-CA",
          "F", "'x y'", '"', "'", "\x00", "\ud800", "é", "9" * 50, " "]


@given(st.text(max_size=300) | st.lists(st.sampled_from(TOKENS), max_size=40).map(" ".join))
def test_any_text_is_a_query_or_a_one_line_query_error(text):
    try:
        q = parse_query(text)
    except ConfigError as exc:
        msg = str(exc)
        assert msg.startswith("query: ") and "\n" not in msg
        return
    mask = evaluate(q.tree, COLS, VOCAB)  # a parsed query always evaluates
    assert mask.dtype == bool and mask.shape == (len(ROWS),)


def _leaf(draw_attr, draw_values, negate_in, neq):
    attr, values = draw_attr, draw_values
    if neq:
        return f"{attr} != {values[0]}", (lambda r: r[attr] != values[0])
    text = f"{attr} {'not in' if negate_in else 'in'} ({', '.join(values)})"
    return text, (lambda r: (r[attr] in values) != negate_in)


leaves = st.builds(
    _leaf, st.sampled_from(sorted(VOCAB)), st.lists(st.sampled_from(["18-24", "25-34", "65+", "US-CA", "US-TX",
                                                                     "F", "M", "other"]), min_size=1, max_size=3),
    st.booleans(), st.booleans())


def _combine(children):
    return st.one_of(
        st.tuples(st.just("and"), st.lists(children, min_size=2, max_size=3)),
        st.tuples(st.just("or"), st.lists(children, min_size=2, max_size=3)),
        st.tuples(st.just("not"), st.lists(children, min_size=1, max_size=1)),
    ).map(_join)


def _join(node):
    op, kids = node
    if op == "not":
        text, fn = kids[0]
        return f"not ({text})", (lambda r: not fn(r))
    texts = [f"({t})" for t, _ in kids]
    fns = [f for _, f in kids]
    if op == "and":
        return f" {op} ".join(texts), (lambda r: all(f(r) for f in fns))
    return f" {op} ".join(texts), (lambda r: any(f(r) for f in fns))


@given(st.recursive(leaves, _combine, max_leaves=8))
def test_a_grammar_query_matches_a_direct_reading(query):
    text, fn = query
    mask = evaluate(parse_query(text).tree, COLS, VOCAB)
    assert mask.tolist() == [fn(r) for r in ROWS], text
