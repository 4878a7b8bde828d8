"""The synthetic event log: determinism, validity, malformed lines, realism and the distribution shift."""

import collections
import math
import time

import numpy as np
import pytest

from loopline.errors import ConfigError, InvalidEvent
from loopline.ops.generate import MALFORMED_KINDS, GenerateConfig, generate, generate_labelled, write_log
from loopline.state.events import REASONS, Conversion, Impression, parse_event

DUPLICATES = ("duplicate_impression", "duplicate_conversion")
INGEST_ONLY = DUPLICATES + ("ts_ahead",)  # reasons the ingest core gives, not parse_event


def _reason(line: bytes):
    try:
        parse_event(line)
    except InvalidEvent as exc:
        return exc.reason
    return None


@pytest.fixture(scope="module")
def week():
    """1,000 users for 7 days, no malformed lines: parsed events and the summary."""
    cfg = GenerateConfig(users=1000, days=7, seed=11)
    events = [parse_event(line) for line in generate(cfg)]
    return cfg, events


@pytest.fixture(scope="module")
def dirty():
    """A small log with 5% malformed lines: (line, intended reason) pairs."""
    cfg = GenerateConfig(users=300, days=2, seed=5, malformed=0.05)
    return cfg, list(generate_labelled(cfg))


def _impressions(events):
    return {e.id: e for e in events if isinstance(e, Impression)}


def _conversions(events):
    return [e for e in events if isinstance(e, Conversion)]


# -- determinism ---------------------------------------------------------------------------------------
def test_same_seed_gives_byte_identical_log():
    cfg = GenerateConfig(users=200, days=2, seed=7, malformed=0.02)
    assert list(generate(cfg)) == list(generate(GenerateConfig(users=200, days=2, seed=7, malformed=0.02)))


def test_different_seeds_give_different_logs():
    a = list(generate(GenerateConfig(users=200, days=2, seed=1)))
    b = list(generate(GenerateConfig(users=200, days=2, seed=2)))
    assert a != b
    assert len(set(a) & set(b)) < len(a) // 10


def test_write_log_writes_newline_terminated_lines_and_matching_summary(tmp_path):
    cfg = GenerateConfig(users=200, days=2, seed=3, malformed=0.03)
    path = tmp_path / "events.jsonl"
    summary = write_log(cfg, path)
    data = path.read_bytes()
    assert data.endswith(b"\n")
    lines = data[:-1].split(b"\n")
    assert lines == list(generate(cfg))
    assert summary["lines"] == len(lines) and summary["bytes"] == len(data)
    labelled = list(generate_labelled(cfg))
    assert summary["malformed"] == dict(collections.Counter(r for _, r in labelled if r is not None))
    assert summary["valid"] == summary["impressions"] + summary["conversions"]
    assert summary["conversions"] == summary["clicks"] + summary["purchases"]
    assert summary["start_ts"] < summary["shift_ts"] < summary["end_ts"]


# -- validity ------------------------------------------------------------------------------------------
def test_every_valid_line_parses_with_unique_ids_in_event_time_order(week):
    cfg, events = week
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids))
    assert all(i.startswith("i") for i in _impressions(events)) and all(
        c.id.startswith("v") for c in _conversions(events))
    ts = [e.ts for e in events]
    assert ts == sorted(ts)
    assert cfg.start_ts <= ts[0]
    imps = list(_impressions(events).values())
    assert all(cfg.start_ts <= e.ts < cfg.start_ts + cfg.days * 86400 for e in imps)
    assert {e.vertical for e in imps} <= set(cfg.verticals)
    assert all(e.user.startswith("u") and set(e.attrs) >= {"age", "gender", "geo", "device"} for e in imps)
    assert all(set(e.features) == {"slot", "hour"} for e in imps)


def test_valid_lines_of_a_dirty_log_all_parse(dirty):
    _, labelled = dirty
    valid = [line for line, r in labelled if r is None]
    assert valid and all(_reason(line) is None for line in valid)


def test_disorder_keeps_lines_within_the_allowed_disorder():
    cfg = GenerateConfig(users=200, days=1, seed=4, disorder_s=300)
    ts = [parse_event(line).ts for line in generate(cfg)]
    assert ts != sorted(ts)
    running = -math.inf
    for t in ts:
        running = max(running, t)
        assert t >= running - 300


# -- malformed lines -----------------------------------------------------------------------------------
def test_malformed_lines_fail_parse_event_with_the_intended_reason(dirty):
    _, labelled = dirty
    bad = [(line, r) for line, r in labelled if r is not None and r not in INGEST_ONLY]
    assert bad
    wrong = [(r, _reason(line), line[:120]) for line, r in bad if _reason(line) != r]
    assert not wrong


def test_malformed_count_and_kinds_cover_every_reason(dirty):
    cfg, labelled = dirty
    n_valid = sum(r is None for _, r in labelled)
    reasons = collections.Counter(r for _, r in labelled if r is not None)
    assert sum(reasons.values()) == round(cfg.malformed * n_valid)
    assert set(reasons) == {r for _, r in MALFORMED_KINDS}
    assert set(reasons) == set(REASONS)  # every reason code of the contract is exercised


def test_malformed_lines_are_single_lines_and_only_one_is_a_megabyte(dirty):
    _, labelled = dirty
    assert not any(b"\n" in line or b"\r" in line for line, _ in labelled)
    too_long = [len(line) for line, r in labelled if r == "line_too_long"]
    assert len(too_long) >= 2
    assert sum(n > 500_000 for n in too_long) == 1
    assert all(64 * 1024 < n < 100_000 for n in too_long if n <= 500_000)


def test_duplicates_are_exact_copies_of_an_earlier_valid_line(dirty):
    _, labelled = dirty
    seen = set()
    dups = 0
    for line, r in labelled:
        if r in DUPLICATES:
            assert line in seen
            ev = parse_event(line)
            assert isinstance(ev, Impression if r == "duplicate_impression" else Conversion)
            dups += 1
        elif r is None:
            seen.add(line)
    assert dups >= 2


def test_ingest_dead_letters_exactly_the_intended_reasons(dirty):
    from loopline.state.ingest import IngestCore

    _, labelled = dirty
    core = IngestCore({}, partition=0)
    for src, (line, _) in enumerate(labelled):
        core.handle(line, offset=src)
    core.end_of_log()
    expected = collections.Counter(r for _, r in labelled if r is not None)
    assert core.counts()["deadletter"] == dict(expected)


# -- realism -------------------------------------------------------------------------------------------
def test_attribute_values_are_zipf_skewed(week):
    _, events = week
    users = {e.user: e.attrs for e in _impressions(events).values()}
    for name in ("geo", "interest", "age"):
        counts = collections.Counter(a[name] for a in users.values())
        top, rare = counts.most_common()[0][1], counts.most_common()[-1][1]
        assert top >= 5 * rare, (name, counts)
    geo = collections.Counter(a["geo"] for a in users.values())
    assert geo.most_common()[0][1] >= 20 * geo.most_common()[-1][1]


def test_click_rate_is_plausible(week):
    _, events = week
    imps = _impressions(events)
    clicks = [c for c in _conversions(events) if c.kind == "click"]
    assert 0.02 <= len(clicks) / len(imps) <= 0.10
    assert len({c.impression for c in clicks}) == len(clicks)  # at most one click per impression


def test_user_activity_varies(week):
    _, events = week
    per_user = collections.Counter(e.user for e in _impressions(events).values())
    counts = np.array(sorted(per_user.values()))
    assert counts[-1] >= 10 * np.median(counts)


def test_conversions_reference_earlier_impressions(week):
    _, events = week
    imps = _impressions(events)
    convs = _conversions(events)
    assert convs
    assert {c.kind for c in convs} == {"click", "purchase"}
    for c in convs:
        assert c.ts > imps[c.impression].ts
        assert (c.value > 0) == (c.kind == "purchase")


def test_some_purchases_land_after_the_window_and_clicks_do_not(week):
    cfg, events = week
    imps = _impressions(events)
    delay = collections.defaultdict(list)
    for c in _conversions(events):
        delay[c.kind].append(c.ts - imps[c.impression].ts)
    late = [d for d in delay["purchase"] if d > cfg.window_s]
    assert 1 <= len(late) < len(delay["purchase"]) / 2
    assert max(delay["click"]) < cfg.window_s
    assert np.median(delay["click"]) < 600  # minutes, not hours
    assert np.median(delay["purchase"]) > np.median(delay["click"])


# -- the shift -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shifted():
    cfg = GenerateConfig(users=3000, days=7, seed=0, campaigns=6, ads_per_campaign=2)
    events = [parse_event(line) for line in generate(cfg)]
    return cfg, events, cfg.start_ts + cfg.shift_at * cfg.days * 86400


def test_shift_changes_the_campaign_mix(week):
    cfg, events = week
    shift = cfg.start_ts + cfg.shift_at * cfg.days * 86400
    imps = _impressions(events).values()
    before = collections.Counter(e.campaign for e in imps if e.ts < shift)
    after = collections.Counter(e.campaign for e in imps if e.ts >= shift)
    nb, na = sum(before.values()), sum(after.values())
    tv = 0.5 * sum(abs(before[c] / nb - after[c] / na) for c in set(before) | set(after))
    assert tv > 0.3
    assert set(before) - set(after) and set(after) - set(before)  # some stop, some start


def test_shift_changes_the_click_rate_of_continuing_ads(shifted):
    _, events, shift = shifted
    imps = _impressions(events)
    clicked = {c.impression for c in _conversions(events) if c.kind == "click"}
    stat = collections.defaultdict(lambda: np.zeros(4))
    for i, e in imps.items():
        k = 0 if e.ts < shift else 2
        stat[e.ad][k] += 1
        stat[e.ad][k + 1] += i in clicked
    z = []
    for n0, c0, n1, c1 in stat.values():
        if n0 >= 300 and n1 >= 300:
            p = (c0 + c1) / (n0 + n1)
            z.append((c1 / n1 - c0 / n0) / math.sqrt(p * (1 - p) * (1 / n0 + 1 / n1)))
    assert len(z) >= 2
    assert max(abs(x) for x in z) > 4


# -- config --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("users", 0), ("users", 1.5), ("days", 0), ("days", float("nan")), ("seed", -1), ("malformed", 1.5),
    ("shift_at", -0.1), ("verticals", ()), ("verticals", ("feed", "feed")), ("campaigns", 0),
    ("ads_per_campaign", 0), ("impressions_per_user_day", 0), ("window_s", -1), ("base_ctr", 0.7),
    ("purchase_rate", 2), ("disorder_s", -5), ("start_ts", True),
])
def test_config_error_message_starts_with_the_field(field, value):
    with pytest.raises(ConfigError) as exc:
        GenerateConfig(**{field: value})
    assert str(exc.value).startswith(f"{field}: ")


def test_config_error_for_users_says_what_and_got():
    with pytest.raises(ConfigError, match=r"^users: must be >= 1, got 0$"):
        GenerateConfig(users=0)


def test_tiny_configs_still_generate_and_label_correctly():
    cfg = GenerateConfig(users=3, days=1, campaigns=1, ads_per_campaign=1, verticals=("feed",), malformed=1.0)
    labelled = list(generate_labelled(cfg))
    assert sum(r is None for _, r in labelled) > 0
    assert all(_reason(line) == (None if r in DUPLICATES else r) for line, r in labelled)


# -- speed ---------------------------------------------------------------------------------------------
def test_ten_thousand_users_for_a_week_is_fast(tmp_path):
    t = time.perf_counter()
    summary = write_log(GenerateConfig(users=10_000, days=7, seed=1), tmp_path / "big.jsonl")
    elapsed = time.perf_counter() - t
    assert summary["impressions"] > 150_000
    assert elapsed < 10, elapsed
