"""The reach query language: precedence, evaluation against a per-row reference, bounded size, and
one-line errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest

from loopline.errors import ConfigError
from loopline.state.reach_query import QueryLimits, evaluate, parse_query

VALUES = {"age": ["18-24", "25-34", "65+"], "gender": ["F", "M"], "geo": ["US-CA", "US-TX", "IS-1"]}


def reference(tree, row: dict) -> bool:
    kind = tree[0]
    if kind == "in":
        return row.get(tree[1]) in tree[2]
    if kind == "not":
        return not reference(tree[1], row)
    if kind == "and":
        return all(reference(t, row) for t in tree[1])
    if kind == "or":
        return any(reference(t, row) for t in tree[1])
    return True


def test_and_binds_tighter_than_or_and_not_binds_tightest():
    q = parse_query("a = 1 or b = 2 and not c = 3")
    b_and_not_c = ("and", (("in", "b", ("2",)), ("not", ("in", "c", ("3",)))))
    assert q.tree == ("or", (("in", "a", ("1",)), b_and_not_c))
    assert q.attrs == ("a", "b", "c")


def test_value_forms_and_keywords_in_any_case():
    q = parse_query("Age IN (18-24, \"25-34\", 65+) AND geo != 'US CA' and x not in (a/b, c:d)")
    assert q.tree[1][0] == ("in", "Age", ("18-24", "25-34", "65+"))
    assert q.tree[1][1] == ("not", ("in", "geo", ("US CA",)))
    assert q.tree[1][2] == ("not", ("in", "x", ("a/b", "c:d")))


@pytest.mark.parametrize("text", ["", "*", "  *  "])
def test_empty_or_star_matches_everyone(text):
    assert parse_query(text).tree == ("all",)


def test_evaluation_equals_a_row_by_row_reference_on_random_queries():
    from loopline.ops.bench_reach import random_queries
    rng = np.random.default_rng(0)
    n = 300
    cols = {a: rng.integers(-1, len(v), n).astype(np.int32) for a, v in VALUES.items()}
    vocab = {a: {v: i for i, v in enumerate(vals)} for a, vals in VALUES.items()}
    rows = [{a: (VALUES[a][cols[a][i]] if cols[a][i] >= 0 else None) for a in VALUES} for i in range(n)]
    texts = [t for t in random_queries(200, 1) if set(parse_query(t).attrs) <= set(VALUES) | {"device", "interest"}]
    checked = 0
    for text in texts + ["age in (18-24, 65+) or not gender = F", "not (geo = US-CA or geo = IS-1)"]:
        q = parse_query(text)
        got = evaluate(q.tree, cols, vocab)
        want = np.array([reference(q.tree, r) for r in rows])
        assert (got == want).all(), text
        checked += 1
    assert checked > 50


@pytest.mark.parametrize("text, fragment", [
    ("age in (18-24", "expected ',' or ')'"),
    ("age =", "expected a value"),
    ("age in ()", "expected a value"),
    ("(gender = F", "expected ')'"),
    ("gender = F geo = US", "unexpected 'geo'"),
    ("gender ~ F", "unexpected character '~'"),
    ("__import__('os').system('true')", "expected '=', '!=' or 'in' after '__import__'"),
    ("1age = 3", "expected an attribute name"),
    ("gender F", "expected '=', '!=' or 'in'"),
    ("and gender = F", "expected an attribute name"),
    ("not", "expected an attribute"),
])
def test_bad_queries_raise_one_line_errors_naming_the_column(text, fragment):
    with pytest.raises(ConfigError) as e:
        parse_query(text)
    msg = str(e.value)
    assert msg.startswith("query: ") and "\n" not in msg and fragment in msg and "column" in msg


@pytest.mark.parametrize("text, limits, fragment", [
    ("a = 1 and " * 10 + "a = 1", QueryLimits(max_predicates=5), "more than 5 comparisons"),
    ("(" * 40 + "a = 1" + ")" * 40, QueryLimits(), "nested deeper than 32"),
    ("not " * 40 + "a = 1", QueryLimits(), "nested deeper than 32"),
    ("a in (" + ", ".join(str(i) for i in range(20)) + ")", QueryLimits(max_values=10), "more than 10 values"),
    ("a = " + "x" * 5000, QueryLimits(), "longer than 4096 characters"),
])
def test_query_size_is_bounded(text, limits, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_query(text, limits)


def test_unknown_attribute_or_value_matches_nobody_and_its_negation_everybody():
    cols = {"gender": np.array([0, 1, -1], dtype=np.int32)}
    vocab = {"gender": {"F": 0, "M": 1}}
    assert not evaluate(parse_query("planet = mars").tree, cols, vocab).any()
    assert not evaluate(parse_query("gender = X").tree, cols, vocab).any()
    assert evaluate(parse_query("gender != X").tree, cols, vocab).all()
    assert evaluate(parse_query("gender != F").tree, cols, vocab).tolist() == [False, True, True]
