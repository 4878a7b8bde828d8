"""``loopline reach`` from an event log, a sample file and a query file; one-line errors; a partial
answer when a worker does not answer; and a smoke run of ``bench reach``."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import orjson
import pytest

from loopline.ops.cli import main
from loopline.ops.generate import QUALITY_SOURCES, GenerateConfig, write_log
from loopline.ops.reach import ask_workers


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("reach") / "log.jsonl")
    write_log(GenerateConfig(users=400, days=2, seed=9, malformed=0.02), path)
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_batch_queries_answer_one_json_object_per_line_with_the_query(log, tmp_path, capsys):
    qfile = tmp_path / "q.txt"
    qfile.write_text("gender = F\n\n# a comment\nage in (18-24, 25-34) and not geo = US-CA\nage in (\n*\n")
    rc, out, _ = run(capsys, "reach", "--events", log, "--queries", str(qfile), "--budget-users", "320", "--json")
    assert rc == 0
    lines = [orjson.loads(x) for x in out.splitlines()]
    assert [x["query"] for x in lines] == ["gender = F", "age in (18-24, 25-34) and not geo = US-CA", "age in (", "*"]
    assert lines[2]["error"].startswith("query: ")
    everyone = lines[3]
    assert lines[0]["users"] < everyone["users"] and lines[1]["users"] < everyone["users"]
    for a in (lines[0], lines[1], everyone):
        assert a["users_ci"][0] <= a["users"] <= a["users_ci"][1]
        assert a["impressions_ci"][0] <= a["impressions"] <= a["impressions_ci"][1]
        assert isinstance(a["fallback"], bool)
        assert a["range"]["to"] - a["range"]["from"] <= 2 * 86_400 + 3600 and a["sample_bytes"] > 0
        assert a["sample_users"] <= 320 and a["budget_users"] == 320


def test_a_saved_sample_answers_like_the_log_it_came_from(log, tmp_path, capsys):
    sample = str(tmp_path / "s.json")
    q = "gender = M or device = ios"
    rc, out, _ = run(capsys, "reach", q, "--events", log, "--budget-users", "200", "--save-sample", sample, "--json")
    assert rc == 0
    from_log = orjson.loads(out)
    rc, out, _ = run(capsys, "reach", q, "--sample", sample, "--json")
    from_file = orjson.loads(out)
    assert rc == 0 and from_file["users"] == from_log["users"] and from_file["impressions"] == from_log["impressions"]
    assert from_log["sample"]["bytes_per_user"] > 0


@pytest.mark.parametrize("argv, fragment", [
    (["reach", "gender = = F", "--events", "LOG"], "ConfigError: query: expected a value"),
    (["reach", "--events", "LOG"], "ConfigError: query: give a query"),
    (["reach", "*", "--events", "/nonexistent.jsonl"], "ConfigError: events: cannot read"),
    (["reach", "*", "--sample", "LOG"], "ConfigError: sample: "),
    (["reach", "*", "--events", "LOG", "--budget-users", "0"], "ConfigError: budget_users: "),
])
def test_errors_are_one_line_with_exit_code_2(log, capsys, argv, fragment):
    rc, out, err = run(capsys, *[log if a == "LOG" else a for a in argv])
    assert rc == 2 and out == ""
    assert err.startswith(fragment) and err.count("\n") == 1


class _Slow(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        time.sleep(5)

    def log_message(self, *args):
        pass


def test_workers_that_are_down_or_hung_give_a_partial_answer_within_the_timeout():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refused
    server = HTTPServer(("127.0.0.1", 0), _Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hung = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        t0 = time.monotonic()
        a = ask_workers([dead, hung], "gender = F", timeout=0.5)
        assert time.monotonic() - t0 < 3.0
    finally:
        server.shutdown()
    assert a["partial"] and a["users"] == 0
    assert a["workers"][dead] != "ok" and a["workers"][hung] != "ok"


def test_bench_reach_smoke(tmp_path):
    from loopline.ops.bench_reach import POPULATIONS, bench_reach, table
    out = bench_reach(users=20_000, budgets=(0.02, 0.05), per_bucket=6, candidates=300, reps=1, latency_users=2000,
                      repeats=1, http_workers=False, out_path=str(tmp_path / "b.json"))
    assert set(out["populations"]) == set(POPULATIONS) and len(POPULATIONS) >= 3
    for pop in out["populations"].values():
        at = pop["budgets"]["0.02"]
        assert at["sample_users"] == 400 and at["sample_bytes"] > 0
        assert set(at["buckets"]) == {"10%+", "1-10%", "0.1-1%", "<0.1%"} and set(at["groups"]) == {">=1%", "<1%"}
        big = at["buckets"]["10%+"]
        for m in ("ours", "uniform", "proportional", "theta"):
            assert 0 <= big[m]["users_median_rel_err"] < 0.5
            assert 0 <= big[m]["users_coverage"] <= 1
        assert set(at["goals"]) == {"common_within_1.25x", "rare_at_most_half", "coverage_0.90_0.98"}
    assert out["latency_in_process_ms"]["p50"] > 0
    assert "| correlated | <1% |" in table(out)
    assert (tmp_path / "b.json").exists()


def test_quality_adjusts_a_rule_naming_a_source_segment(tmp_path, capsys):
    """``loopline reach --quality`` on a log with sources of known quality: the good source's labelled
    audience is scaled by its fitted a, an exclusion by b, each with an interval at least as wide."""
    path = str(tmp_path / "q.jsonl")
    summary = write_log(GenerateConfig(users=600, days=3, seed=4, quality_sources=QUALITY_SOURCES), path)
    good = next(s for s in summary["quality"]["sources"] if s["source"] == "s_good")
    rule = f"seg.s_good.{good['segment']} = yes"
    rc, out, err = run(capsys, "reach", rule, "--events", path, "--quality", "--json")
    assert rc == 0, err
    ans = orjson.loads(out)
    adj = ans["quality_adjusted"]
    assert adj["source"] == "s_good" and adj["labelled"] is True
    assert adj["users"] == pytest.approx(ans["users"] * adj["rate"], rel=1e-3)
    assert adj["rate_ci"][0] <= good["a"] <= adj["rate_ci"][1]
    assert adj["users_ci"][1] - adj["users_ci"][0] >= (ans["users_ci"][1] - ans["users_ci"][0]) * adj["rate"]
    rc, out, err = run(capsys, "reach", f"not {rule}", "--events", path, "--quality", "--json")
    assert rc == 0, err
    assert orjson.loads(out)["quality_adjusted"]["labelled"] is False
    rc, out, err = run(capsys, "reach", "age = 25-34", "--events", path, "--quality", "--json")
    assert rc == 0 and "quality_adjusted" not in orjson.loads(out)  # no source named: nothing to adjust
