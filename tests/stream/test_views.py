"""HTTP views: computed off the event loop (``CachedView``), Faust's table and router endpoints off by
default, and every handler total: a 2xx, or a 4xx with a one-line error, never a 500 (a hypothesis
fuzz against one role ``all`` worker and one ``monitor`` worker, started once for the module)."""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
import urllib.parse

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopline.errors import ConfigError
from loopline.ops.broker import EmbeddedBroker, create_topics
from loopline.ops.eventlog import read_log
from loopline.ops.generate import GenerateConfig, write_log
from loopline.ops.replay import replay
from loopline.ops.worker import WorkerProcess
from loopline.stream.app import TOPICS, CachedView, WorkerConfig, build_app, make_table
from tests.conftest import wait_for

# -- the helper, without a broker -------------------------------------------------------------------


async def _max_loop_lag(during) -> float:
    """The longest the event loop went without running a 10 ms ticker while ``during`` ran."""
    lag, stop = [0.0], asyncio.Event()

    async def tick():
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            lag[0] = max(lag[0], now - last - 0.01)
            last = now

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0.02)
    try:
        return_value = await during
    finally:
        stop.set()
        await ticker
    return lag[0], return_value


async def test_a_slow_view_does_not_stall_the_event_loop():
    view = CachedView("slow", ttl_s=60.0)
    lag, body = await _max_loop_lag(view.get(lambda: time.sleep(0.4) or {"n": 1}))
    assert orjson.loads(body) == {"n": 1}
    assert lag < 0.15, f"the loop stalled {lag:.3f}s while a view computed"


async def test_concurrent_requests_share_one_computation_and_the_answer_is_reused():
    calls = []
    view = CachedView("shared", ttl_s=60.0)

    def compute():
        calls.append(threading.current_thread().name)
        time.sleep(0.05)
        return len(calls)

    answers = await asyncio.gather(*[view.get(compute) for _ in range(5)])
    assert answers == [b"1"] * 5 and len(calls) == 1
    assert calls[0].startswith("loopline-view"), "computed on the loop's thread"
    assert await view.get(compute) == b"1" and view.stats["cached"] == 1


async def test_answers_expire_and_are_bounded_per_key():
    view = CachedView("keys", ttl_s=0.0, max_keys=2)
    n = iter(range(100))
    first = await view.get(lambda: next(n), key="a")
    assert await view.get(lambda: next(n), key="a") != first  # ttl 0: every request computes
    for k in ("b", "c", "d"):
        await view.get(lambda: 0, key=k)
    assert len(view._answers) == 2 and view.stats["evicted"] == 2


async def test_a_collision_with_the_agents_is_retried_and_a_request_error_is_not():
    view = CachedView("retry", ttl_s=0.0, retries=2)
    tries = []

    def flaky():
        tries.append(1)
        if len(tries) < 3:
            raise RuntimeError("dictionary changed size during iteration")
        return "ok"

    assert await view.get(flaky) == b'"ok"'
    assert view.stats["retried"] == 2 and view.stats["on_loop"] == 1  # the third try ran on the loop

    def bad_query():
        tries.append(1)
        raise ConfigError("query: nope")

    before = len(tries)
    with pytest.raises(ConfigError):
        await view.get(bad_query)
    assert len(tries) == before + 1, "a request's own error must not be retried"


def test_faust_table_and_router_endpoints_follow_web_tables(tmp_path):
    off = build_app(WorkerConfig(store="memory://", data_dir=str(tmp_path / "a"), role="ingest"))
    on = build_app(WorkerConfig(store="memory://", data_dir=str(tmp_path / "b"), role="ingest", web_tables=True))
    assert not off.conf.web_tables_enabled and not off.conf.web_router_enabled
    assert on.conf.web_tables_enabled and on.conf.web_router_enabled
    with pytest.raises(ConfigError, match="view_cache_s"):
        WorkerConfig(view_cache_s=-1)


# -- real workers -----------------------------------------------------------------------------------

VIEWS = ("/score/", "/reach", "/quality", "/fm/", "/vm/", "/ingest/", "/views")  # role all
MONITOR_VIEWS = ("/drift", "/metrics")  # role monitor


def _request(port: int, method: str, target: str, body: bytes = b"", timeout: float = 30.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, target, body=body or None,
                     headers={"Content-Type": "application/json"} if body else {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """A role ``all`` worker that has trained and serves a VM, and a ``monitor`` worker, on one broker."""
    tmp = tmp_path_factory.mktemp("views")
    broker = EmbeddedBroker(log_path=str(tmp / "tansu.log")).start()
    started = []
    try:
        create_topics(broker.bootstrap, {t: 4 for t in TOPICS})
        path = tmp / "events.jsonl"
        write_log(GenerateConfig(users=30, days=1, seed=11), str(path))
        records = read_log(str(path))
        # one VM variant (the serving one) is enough here, and trains sooner
        full = WorkerProcess(broker.url, str(tmp / "all"), 4, extra=("--variants", "base", "--serve", "base")).start()
        mon = WorkerProcess(broker.url, str(tmp / "mon"), 4, extra=("--role", "monitor")).start()
        started += [full, mon]
        full.wait_ready(120)
        asyncio.run(replay(broker.bootstrap, records, 4, progress=False))
        verticals = wait_for(lambda: ((full.view("/vm/") or {}).get("serving") or {}).get("verticals") or None,
                             240, "a served VM", proc=full)
        wait_for(lambda: (mon.view("/drift") or {}).get("ready") or None, 120, "the monitor", proc=mon)
        yield {"all": full, "monitor": mon, "verticals": verticals}
    finally:
        for w in started:  # both stop at once
            if w.proc.poll() is None:
                w.proc.terminate()
        for w in started:
            w.stop()
        broker.stop()


@pytest.mark.integration
def test_faust_table_and_router_endpoints_are_off_by_default(workers):
    port = workers["all"].port
    for path in ("/table/", "/table/attribution/", "/table/attribution/0%7Cm/", "/router/",
                 "/router/attribution/", "/router/attribution/u1/"):
        status, body = _request(port, "GET", path)
        assert status == 404, (path, status, body[:200])
    for path in VIEWS[1:]:
        assert _request(port, "GET", path)[0] == 200, path
    for path in MONITOR_VIEWS:
        assert _request(workers["monitor"].port, "GET", path)[0] == 200, path


def _quoted(t: str) -> str:
    return urllib.parse.quote(t, safe="")


_text = st.text(max_size=30)
_name = st.sampled_from(["age", "gender", "geo", "seg.dmp.sports", "x", "not", "in", "and", "*"])
_value = st.one_of(st.sampled_from(["F", "M", "18-24", "65+", "US-CA", "'a b'", '"', "()"]), _text)
_reach_query = st.lists(st.one_of(_name, _value, st.sampled_from(["=", "!=", "in", "(", ")", ",", "and", "or",
                                                                     "not"])), max_size=12).map(" ".join)
_json = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 63 - 1) | st.floats() | _text,
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
                     max_leaves=12)


@st.composite
def _score_request(draw, verticals):
    """Near-valid ``POST /score/`` bodies: a served vertical, candidates, and edge values."""
    cand = st.fixed_dictionaries({"ad": _text, "campaign": _text},
                                 optional={"features": st.dictionaries(_text, _text, max_size=3)})
    obj = draw(st.fixed_dictionaries(
        {"user": st.one_of(_text, _json), "vertical": st.sampled_from(verticals) | _text,
         "candidates": st.lists(cand, max_size=4) | _json},
        optional={"ts": st.floats() | st.integers(-2 ** 63, 2 ** 63 - 1) | st.sampled_from([1e13, -1.0, "BIG"]),
                  "attrs": st.dictionaries(_text, _text, max_size=3) | _json}))
    # an integer too large for a float is valid JSON that orjson will not write
    return orjson.dumps(obj).replace(b'"BIG"', b"1" + b"0" * 400)


def _query(pairs) -> str:
    return "&".join(f"{_quoted(k)}={_quoted(v)}" for k, v in pairs)


@st.composite
def _http(draw, verticals):
    view = draw(st.sampled_from(VIEWS + MONITOR_VIEWS))
    method = draw(st.sampled_from(["GET", "GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"]))
    if view == "/score/":
        method = draw(st.sampled_from(["POST", "POST", "POST", "GET"]))
    suffix = draw(st.one_of(st.just(""), st.just(""), _text.map(_quoted)))
    query = draw(st.one_of(
        st.just(""),
        st.lists(st.tuples(st.sampled_from(["q", "fit"]), st.one_of(_reach_query, _text, st.sampled_from(["0", "1"]))),
                 max_size=2).map(_query),
        st.lists(st.tuples(_text, _text), max_size=3).map(_query),
        st.sampled_from(["%", "%zz", "q=%ff%fe", "q=%00", "fit=%ff", "q", "&&=&", "q=" + "(" * 300]),
    ))
    body = b""
    if method in ("POST", "PUT", "PATCH"):
        body = draw(st.one_of(_score_request(verticals), _json.map(orjson.dumps), st.binary(max_size=300)))
    return method, view + suffix + ("?" + query if query else ""), body


@pytest.mark.integration
@pytest.mark.fuzz
def test_every_http_handler_answers_2xx_or_a_one_line_4xx(workers):
    """The strategy draws requests at the handlers (and next to them); the CI profile's examples take a
    few seconds against the running workers."""

    @settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(_http(workers["verticals"]))
    def prop(req):
        method, target, body = req
        view = target.split("?")[0]
        port = workers["monitor" if view.startswith(MONITOR_VIEWS) else "all"].port
        status, payload = _request(port, method, target, body)
        assert status < 500, (method, target, body[:200], status, payload[:500])
        if status >= 400 and method != "HEAD":  # (a HEAD answer has no body)
            text = payload.decode("utf-8", "replace").strip()
            assert text and "\n" not in text and "Traceback" not in text, (method, target, status, text[:500])

    prop()
    # and the serving path the fuzz reaches only now and then answers a plain request
    ok = {"user": "u1", "vertical": workers["verticals"][0], "candidates": [{"ad": "a1", "campaign": "c1"}]}
    status, body = _request(workers["all"].port, "POST", "/score/", orjson.dumps(ok))
    assert status == 200 and len(orjson.loads(body)["scores"]) == 1, (status, body[:300])
    for w in (workers["all"], workers["monitor"]):
        assert w.proc.poll() is None, w.tail()


@pytest.mark.integration
def test_a_ready_worker_has_frozen_its_start_up_objects_out_of_the_collectors_full_passes(workers):
    gcs = (workers["all"].view("/views") or {}).get("_gc") or {}
    assert gcs.get("frozen", 0) > 50_000, gcs
    # the freeze's own full pass at least, counted and timed
    assert len(gcs["collections"]) == 3 and gcs["collections"][2] >= 1 and gcs["total_ms"][2] > 0, gcs


async def test_an_expired_answer_is_served_at_once_while_the_new_one_is_computed():
    view = CachedView("stale", ttl_s=0.0, stale_s=60.0)
    n = iter(range(100))

    def slow():
        time.sleep(0.3)
        return next(n)

    assert await view.get(slow) == b"0"  # nothing cached: the first request waits
    t0 = time.perf_counter()
    assert await view.get(slow) == b"0"  # expired: answered from the cache, a recomputation started
    assert time.perf_counter() - t0 < 0.2 and view.stats["stale"] == 1
    await asyncio.sleep(0.5)
    assert await view.get(slow) == b"1"  # the background computation's answer
    assert view.stats["computed"] >= 2


def test_every_table_store_has_bounded_rocksdb_memory(tmp_path):
    # Faust's defaults are three 64 MiB memtables and a 2 GiB block cache per partition's database
    cfg = WorkerConfig(data_dir=str(tmp_path), role="ingest", table_write_buffer_mb=2, table_block_cache_mb=3)
    opts = make_table(build_app(cfg), cfg, "bounded").data.rocksdb_options
    assert (opts.write_buffer_size, opts.max_write_buffer_number, opts.block_cache_size) == (2 << 20, 2, 3 << 20)
    with pytest.raises(ConfigError, match="^table_block_cache_mb:"):
        WorkerConfig(table_block_cache_mb=0)


def test_a_worker_sets_the_gil_switch_interval_its_config_names(tmp_path):
    # a forward on the event loop waits up to this long for the GIL after each op (WorkerConfig)
    import sys
    before = sys.getswitchinterval()
    try:
        build_app(WorkerConfig(store="memory://", data_dir=str(tmp_path), role="ingest", gil_switch_ms=2.5))
        assert sys.getswitchinterval() == pytest.approx(0.0025)
    finally:
        sys.setswitchinterval(before)
    with pytest.raises(ConfigError, match="^gil_switch_ms:"):
        WorkerConfig(gil_switch_ms=0)


def test_a_worker_sets_the_collectors_young_threshold_its_config_names(tmp_path):
    import gc
    before = gc.get_threshold()
    try:
        build_app(WorkerConfig(store="memory://", data_dir=str(tmp_path), role="ingest", gc_young=12_345))
        assert gc.get_threshold() == (12_345, *before[1:])
    finally:
        gc.set_threshold(*before)
    with pytest.raises(ConfigError, match="^gc_young:"):
        WorkerConfig(gc_young=10)


def test_the_producer_lingers_as_its_config_says(tmp_path):
    # Faust's default (0) sent about one produce request per changelog message
    app = build_app(WorkerConfig(store="memory://", data_dir=str(tmp_path), role="ingest", producer_linger_ms=7))
    assert app.conf.producer_linger == pytest.approx(0.007) and app.producer.linger_ms == 7
    with pytest.raises(ConfigError, match="^producer_linger_ms:"):
        WorkerConfig(producer_linger_ms=-1)


def test_the_heap_keeper_gives_freed_memory_back_to_the_system():
    from loopline.stream.heap import HeapKeeper

    keeper = HeapKeeper(max_arenas=2)
    if not keeper.available:
        pytest.skip("this C library has no malloc_trim/mallopt (glibc only); the keeper does nothing here")

    def rss_kb() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    in_use = keeper.usage()["in_use_mb"]
    chunks = [bytearray(64 * 1024) for _ in range(3000)]  # ~190 MiB in small blocks, below mmap's threshold
    assert keeper.usage()["in_use_mb"] > in_use + 150, "mallinfo2 did not see the allocations"
    keep = chunks[-1]  # the heap's top stays in use: free() alone cannot shrink it
    del chunks
    assert keeper.usage()["free_mb"] > 150, "the freed blocks are not free inside the arena"
    before = rss_kb()
    assert keeper.trim() and keeper.counts == {"trims": 1, "released": 1, "max_arenas": 2}
    assert rss_kb() < before - 100 * 1024, "malloc_trim gave less than 100 MiB back"
    del keep


async def test_the_loop_watch_names_the_function_that_held_the_event_loop():
    from loopline.stream.loop_watch import LoopWatch

    watch = LoopWatch(stall_ms=50, every_s=0.01).start()

    def hold_the_loop():
        time.sleep(0.3)

    await asyncio.sleep(0.05)
    hold_the_loop()
    await asyncio.sleep(0.05)
    watch.stop()
    report = watch.report()
    assert report["stalls"] == 1 and 250 <= report["max_ms"] < 1000
    assert report["top"][0]["where"].endswith(" hold_the_loop"), report
