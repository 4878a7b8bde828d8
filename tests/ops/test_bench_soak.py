"""`loopline bench soak`: the traffic is valid and ever-new, and a short run on the real broker reports
every figure (the 10-minute figures come from the command itself)."""

import json

import pytest

from loopline.ops.bench_soak import SoakConfig, SoakTraffic
from loopline.ops.cli import main
from loopline.ops.eventlog import partition_for
from loopline.errors import ConfigError
from loopline.state.events import Conversion, Impression, event_key, parse_event


def test_traffic_is_valid_in_event_time_order_and_never_repeats_an_id():
    t = SoakTraffic(SoakConfig(seed=2, campaign_every=50, vertical_every=100))
    evs, sim = [], 1_700_000_000.0
    for _ in range(40):  # 40 ticks of 10 minutes of event time
        evs += t.tick(sim, sim + 600, 60)
        sim += 600
    parsed = [parse_event(raw) for _ts, _key, raw in evs]
    assert [e.ts for e in parsed] == sorted(e.ts for e in parsed)
    ids = [e.id for e in parsed]
    assert len(ids) == len(set(ids))
    imps = {e.id: e for e in parsed if isinstance(e, Impression)}
    convs = [e for e in parsed if isinstance(e, Conversion)]
    assert len(imps) == 2400 and convs, "some impressions are clicked"
    for (ts, key, raw), e in zip(evs, parsed):
        assert key == event_key(raw)[0]  # keyed by impression id, routed as replay routes
        assert partition_for(key, raw, 4) == partition_for(event_key(raw)[0], raw, 4)
        if isinstance(e, Conversion):
            assert e.impression in imps and e.ts > imps[e.impression].ts
    # ever-new users, campaigns, verticals and attribute values
    assert t.distinct_users == len({e.user for e in imps.values()}) > 400
    assert len({e.campaign for e in imps.values()}) > 60
    assert len({e.vertical for e in imps.values()}) > 10
    assert len({e.attrs["geo"] for e in imps.values()}) > 40
    assert len({k for e in imps.values() for k in e.attrs}) > 100  # new attribute names


def test_a_bad_setting_names_its_field(capsys):
    with pytest.raises(ConfigError, match="^rate:"):
        SoakConfig(rate=0)
    assert main(["bench", "soak", "--minutes", "-1"]) == 2
    assert capsys.readouterr().err.startswith("ConfigError: minutes:")


def test_a_short_soak_reports_memory_views_and_bounds(tmp_path, capsys):
    out_path = tmp_path / "soak.json"
    assert main(["bench", "soak", "--minutes", "0.25", "--rate", "40", "--json", "--out", str(out_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert json.loads(out_path.read_text()) == out
    assert (tmp_path / "soak.png").read_bytes()[:4] == b"\x89PNG"
    assert out["events"] > 0.5 * 40 * 15 and out["ingested"] > 0
    users = [s["users"] for s in out["samples"]]
    assert users == sorted(users) and users[-1] > users[0] and out["distinct_users"] == users[-1]
    assert out["rss_mb_end"] > 100 and out["rss_mb_warm"] > 100 and out["data_dir_mb"] > 0
    assert abs(sum(out["data_dir_breakdown_mb"].values()) - out["data_dir_mb"]) < 1
    assert abs(out["rss_growth_after_warmup"] - (out["rss_mb_end"] / out["rss_mb_warm"] - 1)) < 1e-3
    assert 50 < out["rss_anon"]["mb_end"] < out["rss_mb_end"]  # the heaps: part of RSS, not all of it
    # malloc's own figures: live allocations (RocksDB's buffers among them) and free space, each within RSS
    assert 0 < out["rocksdb_buffers"]["mb_end"] < out["heap_in_use"]["mb_end"] < out["rss_mb_end"]
    assert 0 <= out["heap_free"]["mb_end"] < out["rss_mb_end"]
    assert out["monitor"]["rss_mb_end"] > 100
    for view in ("/ingest/", "/fm/", "/vm/", "/reach", "/reach?q=...", "/quality", "/metrics", "/drift"):
        assert 0 < out["views_p50_ms"][view] <= out["views_p99_ms"][view] <= out["views_max_ms"][view], view
    assert isinstance(out["bounds"], dict) and out["bounds_watched"], "the views serve bound counters"
    assert set(out["bounds"]) <= set(out["bounds_watched"])
    assert out["stops"] == {"worker": "stopped on SIGTERM", "monitor": "stopped on SIGTERM"}
