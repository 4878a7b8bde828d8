"""``loopline generate --quality`` and ``loopline quality``: recovery on generated data, bad input, the
adjusted reach, errors as one line with exit code 2, and a smoke run of the benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import orjson
import pytest

from loopline.errors import ConfigError
from loopline.ops.bench_quality import bench_quality
from loopline.ops.eventlog import read_log
from loopline.ops.generate import QUALITY_SOURCES, GenerateConfig, generate, write_log
from loopline.ops.quality import quality_counts_from_records
from loopline.state.events import parse_event

CFG = GenerateConfig(users=1500, days=5, seed=2, campaigns=30, quality_sources=QUALITY_SOURCES)


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "loopline.ops.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def quality_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("quality") / "events.jsonl"
    summary = write_log(CFG, str(path))
    return str(path), summary


def test_quality_lines_leave_the_rest_of_the_log_unchanged():
    cfg = GenerateConfig(users=200, days=2, seed=4, malformed=0.02)
    plain = list(generate(cfg))
    with_quality = list(generate(replace(cfg, quality_sources=QUALITY_SOURCES)))
    is_quality = [x.startswith((b'{"type":"segment"', b'{"type":"truth"')) for x in with_quality]
    assert [x for x, q in zip(with_quality, is_quality) if not q] == plain  # same lines, same order
    campaigns = {parse_event(x).campaign for x in plain if x.startswith(b'{"type":"impression","id":"i')}
    truth = [parse_event(x) for x, q in zip(with_quality, is_quality) if q and b'"truth"' in x[:20]]
    assert sorted((t.campaign, t.segment) for t in truth) == sorted(
        (c, g) for c in campaigns for _, g, _, _ in QUALITY_SOURCES)  # one report per campaign and segment


def test_generated_quality_lines_are_valid_and_time_ordered(quality_log):
    path, summary = quality_log
    q = summary["quality"]
    assert [s["source"] for s in q["sources"]] == [s for s, _, _, _ in QUALITY_SOURCES]
    events = [parse_event(line) for line in open(path, "rb").read().splitlines()]
    ts = [e.ts for e in events]
    assert ts == sorted(ts)
    assert sum(e.type == "segment" for e in events) == q["segments"]
    assert sum(e.type == "truth" for e in events) == q["truth_reports"]
    assert summary["valid"] == len(events)


def test_quality_json_recovers_the_generated_sources(quality_log):
    path, summary = quality_log
    r = run_cli("quality", "--events", path, "--json", "--bootstrap", "200")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    rows = {row["source"]: row for row in out["report"]["sources"]}
    truth = {s["source"]: s for s in summary["quality"]["sources"]}
    assert [row["source"] for row in out["report"]["sources"]] == ["s_good", "s_poor", "s_adversarial"]
    assert rows["s_good"]["verdict"] == "good" and rows["s_adversarial"]["verdict"] == "adversarial"
    for name, row in rows.items():
        assert set(row) >= {"a", "b", "a_ci", "b_ci", "precision", "recall", "lift", "campaigns", "verdict"}
        for k in ("a", "b"):
            lo, hi = row[f"{k}_ci"]
            assert lo <= row[k] <= hi
            assert abs(row[k] - truth[name][k]) < 0.15  # within a few interval half-widths of the truth
    assert out["events"]["deadletter"] == 0 and out["events"]["read"] == summary["lines"]


def test_quality_offline_counts_bad_lines_and_answers_thin_sources(tmp_path):
    lines = [
        {"type": "segment", "source": "lonely", "user": "nobody", "segment": "g", "ts": 1.0},
        {"type": "truth", "campaign": "c1", "segment": "g", "fraction": 1.4, "impressions": 100, "ts": 2.0},
        {"type": "truth", "campaign": "c1", "segment": "g", "fraction": 0.4, "impressions": 100, "ts": 2.0},
        {"type": "impression", "id": "i1", "ts": 1.5, "user": "u1", "ad": "a", "campaign": "c1", "vertical": "feed"},
    ]
    path = tmp_path / "thin.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(x) for x in lines) + b"\n")
    r = run_cli("quality", "--events", str(path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["events"]["by_reason"] == {"bad_value": 1}
    [row] = out["report"]["sources"]
    assert row["verdict"] == "too_few_campaigns" and row["skipped"]["few_impressions"] == 1 and row["note"]
    r = run_cli("quality", "--events", str(path))
    assert r.returncode == 0 and "too_few_campaigns" in r.stdout


def test_adjusted_reach_from_the_cli(quality_log, tmp_path):
    path, _ = quality_log
    reach = tmp_path / "reach.json"
    reach.write_text(json.dumps({"users": 400, "users_ci": [350, 450], "impressions": 900,
                                 "impressions_ci": [800, 1000], "fallback": False}))
    r = run_cli("quality", "--events", path, "--json", "--methods", "ls", "--adjust-reach", "s_good:auto_intender",
                "--reach-json", str(reach))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    ar = out["adjusted_reach"]
    row = next(x for x in out["report"]["sources"] if x["source"] == "s_good")
    assert ar["users"] == pytest.approx(400 * row["a"])
    lo, hi = ar["users_ci"]
    assert (hi - lo) / ar["users"] > (450 - 350) / 400  # relatively wider than the reach interval
    r = run_cli("quality", "--events", path, "--adjust-reach", "s_good:nope", "--users", "10", "--users-ci", "5", "20")
    assert r.returncode == 2 and r.stderr.startswith("ConfigError: adjust_reach:") and len(r.stderr.splitlines()) == 1


def test_quality_errors_are_one_line(tmp_path):
    r = run_cli("quality", "--events", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and r.stderr.startswith("ConfigError: events:")
    r = run_cli("quality", "--workers", "127.0.0.1:9", "--json")
    assert r.returncode == 2 and r.stderr.startswith("ConfigError: workers:")
    with pytest.raises(ConfigError, match="^quality_sources:"):
        GenerateConfig(quality_sources=(("s", "g", 1.2, 0.1),))
    with pytest.raises(ConfigError, match="^quality_panel:"):
        GenerateConfig(quality_panel=0)


def test_offline_counts_match_the_generated_labels(quality_log):
    path, summary = quality_log
    agg, events = quality_counts_from_records(read_log(path))
    for s in summary["quality"]["sources"]:
        assert agg["labelled_users"][s["source"]][s["segment"]] == s["labelled_users"]
        assert sum(agg["labelled"][s["source"]][s["segment"]].values()) == s["labelled_impressions"]
    assert sum(agg["impressions"].values()) == summary["impressions"]


def test_quality_benchmark_smoke(tmp_path):
    out = bench_quality(seeds=1, users=300, days=3, campaigns=20, out_path=str(tmp_path / "b.json"), progress=False)
    assert set(out["methods"]) >= {"ls/bootstrap", "ls/users", "em/wald", "em/users", "gls/gls"}
    for m in out["methods"].values():
        assert 0 <= m["coverage"] <= 1 and m["mae_a"] >= 0 and m["median_ms_per_fit"] > 0
    assert json.loads((tmp_path / "b.json").read_text())["seeds"] == 1


def test_adjusted_reach_takes_a_loopline_reach_answer(quality_log, tmp_path):
    path, _ = quality_log
    r = run_cli("reach", "*", "--events", path, "--json")
    assert r.returncode == 0, r.stderr
    answer = tmp_path / "reach.json"
    answer.write_text(r.stdout)
    reach = json.loads(r.stdout)
    r = run_cli("quality", "--events", path, "--json", "--methods", "ls", "--adjust-reach", "s_poor:sports_fan",
                "--reach-json", str(answer), "--exclude")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    row = next(x for x in out["report"]["sources"] if x["source"] == "s_poor")
    ar = out["adjusted_reach"]
    assert ar["labelled"] is False and ar["rate"] == row["b"]  # a rule that excludes the label: b applies
    assert ar["users"] == pytest.approx(reach["users"] * row["b"])
    assert ar["users_ci"][0] <= ar["users"] <= ar["users_ci"][1]
