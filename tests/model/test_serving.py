"""``POST /score/`` without the web framework (``model.serving.score_answer``): the HTTP status comes from the
error's type (404 unknown vertical, 413 too many candidates, 400 any other bad field, 503 a closed store)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import orjson
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopline.errors import ConfigError, NotFound, TooLarge
from loopline.model.serving import MAX_CANDIDATES, ServingModel, _flat, parse_score_request, score_answer
from loopline.model.vm import VMConfig, VMFeaturizer, VMLearner
from loopline.state.history import HistoryStore

CFG = VMConfig(table_size=64, history="mean", sequence="fm", seq_len=4, code_dim=3)


@pytest.fixture
def served(tmp_path):
    history = HistoryStore(str(tmp_path / "h"))
    history.append_embeddings([("u1", 1.0, 1, np.array([0.1, 0.2, 0.3], np.float32))])
    yield {"feed": VMLearner(CFG, seed=0)}, history
    history.close()


def _answer(obj, served, raw=None):
    serving, history = served
    calls = []

    def featurizer():
        calls.append(1)
        return VMFeaturizer(CFG)

    status, body = score_answer(raw if raw is not None else orjson.dumps(obj), serving, featurizer, history, "v")
    return status, body, len(calls)


def _request(n=1, vertical="feed"):
    return {"user": "u1", "vertical": vertical, "ts": 2.0,
            "candidates": [{"ad": f"a{i}", "campaign": "c1"} for i in range(n)]}


def test_a_valid_request_is_scored(served):
    status, body, _ = _answer(_request(3), served)
    assert status == 200, body
    assert body["user"] == "u1" and body["vertical"] == "feed" and body["variant"] == "v"
    assert len(body["scores"]) == 3 and all(0 < s < 1 for s in body["scores"])


@pytest.mark.parametrize("obj,raw,status,field", [
    (_request(vertical="shop"), None, 404, "vertical"),
    (_request(MAX_CANDIDATES + 1), None, 413, "candidates"),
    (_request(MAX_CANDIDATES), None, 200, None),
    ({**_request(), "user": ""}, None, 400, "user"),
    ({**_request(), "candidates": "a1"}, None, 400, "candidates"),
    ({**_request(), "ts": "soon"}, None, 400, "ts"),
    (None, b"{not json", 400, "request"),
    ([1, 2], None, 400, "request"),
], ids=["unknown-vertical", "too-many-candidates", "at-the-limit", "empty-user", "candidates-not-a-list",
        "ts-not-a-number", "not-json", "not-an-object"])
def test_the_status_comes_from_the_errors_type(served, obj, raw, status, field):
    got, body, featurized = _answer(obj, served, raw)
    assert got == status, body
    if field is not None:
        assert body["error"].startswith(f"{field}:") and "\n" not in body["error"], body
        assert featurized == 0  # a bad request never reaches the model


def test_a_closed_history_store_answers_503(served):
    served[1].close()
    status, body, _ = _answer(_request(), served)
    assert status == 503 and body["error"].startswith("store:"), body


def test_parse_score_request_raises_the_typed_errors_which_are_still_config_errors():
    with pytest.raises(NotFound, match="^vertical:"):
        parse_score_request(_request(vertical="shop"), {"feed"})
    with pytest.raises(TooLarge, match="^candidates: at most 2 per request, got 3"):
        parse_score_request(_request(3), {"feed"}, max_candidates=2)
    with pytest.raises(ConfigError):
        parse_score_request(_request(vertical="shop"), {"feed"})


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
                     max_leaves=12)


@st.composite
def _near_valid(draw):
    """Bodies close to a valid request: each field replaced by any JSON now and then."""
    cand = {"ad": draw(st.one_of(st.text(max_size=8), _json)), "campaign": draw(st.one_of(st.just("c1"), _json))}
    if draw(st.booleans()):
        cand["features"] = draw(_json)
    obj = {"user": draw(st.one_of(st.just("u1"), _json)), "vertical": draw(st.one_of(st.just("feed"), _json)),
           "candidates": draw(st.one_of(st.lists(st.just(cand), max_size=3), _json))}
    if draw(st.booleans()):
        obj["ts"] = draw(st.one_of(st.floats(), _json))
    if draw(st.booleans()):
        obj["attrs"] = draw(_json)
    # the standard library writes what orjson refuses to (integers past 64 bits, NaN): bodies a client may send
    return json.dumps(obj).encode() if draw(st.booleans()) else draw(st.binary(max_size=200))


@pytest.mark.fuzz
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # scoring reads, never writes
@given(body=_near_valid())
def test_any_body_gets_a_score_or_a_4xx_with_one_line_never_an_exception(served, body):
    status, answer, _ = _answer(None, served, raw=body)
    assert status == 200 or 400 <= status < 500, (status, answer)
    if status == 200:
        assert all(0.0 <= s <= 1.0 for s in answer["scores"])
    else:
        assert answer["error"] and "\n" not in answer["error"]


_field = st.one_of(st.text(max_size=3), st.text(min_size=255, max_size=257), st.integers(), st.none(),
                   st.dictionaries(st.text(max_size=2), st.one_of(st.text(max_size=2), st.integers()), max_size=2))


@pytest.mark.fuzz
@given(cands=st.lists(st.fixed_dictionaries({"ad": _field, "campaign": _field},
                                            optional={"features": _field, "x": _field}), max_size=3))
def test_the_candidates_fast_path_accepts_and_gives_what_the_field_checks_do(cands):
    from loopline.model.serving import _str_map, _string
    try:
        want = [{"ad": _string(c, "ad", f"candidates[{i}]."), "campaign": _string(c, "campaign", f"candidates[{i}]."),
                 "features": dict(_str_map(c, "features", f"candidates[{i}]."))} for i, c in enumerate(cands)]
    except ConfigError as exc:
        with pytest.raises(ConfigError) as got:
            parse_score_request({"user": "u", "vertical": "v", "candidates": cands}, {"v"})
        assert str(got.value) == str(exc)
        return
    req = parse_score_request({"user": "u", "vertical": "v", "candidates": cands}, {"v"})
    assert [dict(c, features=dict(c["features"])) for c in req.candidates] == want


# ServingModel: the traced serving copy /score/ answers from

def _batches(cfg, sizes=(1, 4, 17)):
    """Batches of several sizes, histories of several lengths, some attrs and features missing."""
    f = VMFeaturizer(cfg)
    rng = np.random.default_rng(0)
    out = []
    for n in sizes:
        exs = [{"ad": f"a{rng.integers(50)}", "campaign": f"c{rng.integers(5)}", "vertical": "feed", "label": i % 2,
                "attrs": {"age": "25-34"} if i % 3 else {}, "features": {"slot": str(i)} if i % 2 else {}}
               for i in range(n)]
        seq = int(rng.integers(0, cfg.seq_len + 3))
        codes = [rng.standard_normal((seq, cfg.code_dim)).astype(np.float32)] * n
        raw = [[(float(t), f"a{t}", "c1", "impression") for t in range(seq)]] * n
        out.append(f.batch(exs, codes, raw))
    return out


@pytest.mark.parametrize("variant", ["base", "loopfm+kd", "ah+sa", "raw+loopfm", "loopfm+kd+mods"])
def test_the_traced_serving_copy_with_one_id_lookups_scores_as_the_learner_bit_for_bit(variant):
    from loopline.model.serving import _OneId
    from loopline.model.verticals import VMStageConfig
    cfg = replace(VMStageConfig().config_of(variant), table_size=128, seq_len=6)
    learner = VMLearner(cfg, seed=1)
    serving = ServingModel(learner.model, cfg)
    assert serving.traced
    served = serving._model
    assert all(isinstance(t[f], _OneId) for t in (served.bags, served.first) for f in ("ad", "campaign"))
    assert isinstance(learner.model.bags["ad"], torch.nn.EmbeddingBag)  # training keeps its bags
    for b in _batches(cfg):
        assert np.array_equal(serving.predict_many(b), learner.predict_many(b))


def test_a_refresh_serves_the_new_weights_without_tracing_again(monkeypatch):
    cfg = replace(CFG, history="attention")
    learner = VMLearner(cfg, seed=0)
    serving = ServingModel(learner.model, cfg)
    monkeypatch.setattr(torch.jit, "trace", lambda *a, **k: pytest.fail("traced again"))
    batches = _batches(cfg)
    before = serving.predict_many(batches[2])
    for _ in range(3):
        learner.learn_many(batches[2])
        serving.refresh(learner.model)
        assert np.array_equal(serving.predict_many(batches[1]), learner.predict_many(batches[1]))
    assert not np.array_equal(serving.predict_many(batches[2]), before)


def test_a_refresh_waits_for_a_forward_in_flight():
    """The vm's thread refreshes the one serving copy while the event loop may be inside a traced
    forward (the GIL released): the refresh must not change the weights under it."""
    import threading
    learner = VMLearner(CFG, seed=0)
    serving = ServingModel(learner.model, CFG)
    b = _batches(CFG)[1]
    before = serving.predict_many(b)
    learner.learn_many(_batches(CFG)[2])
    with serving._lock:  # what a forward holds
        t = threading.Thread(target=serving.refresh, args=(learner.model,))
        t.start()
        t.join(0.2)
        assert t.is_alive(), "the refresh did not wait for the forward"
        assert np.array_equal(serving._fn(*_flat(b, CFG.fields)).numpy().astype(np.float64), before)
    t.join(5)
    assert not t.is_alive()
    assert np.array_equal(serving.predict_many(b), learner.predict_many(b))


def test_a_copy_with_fp8_dispatched_layers_is_served_eagerly():
    from loopline.kernels.dispatch import apply_table
    from loopline.model.verticals import VMStageConfig
    cfg = replace(VMStageConfig().config_of("base"), table_size=64)
    learner = VMLearner(cfg, seed=0)
    model = copy.deepcopy(learner.model)
    assert apply_table(model, {"layers": [{"name": "serving", "choice": "emulated:row"}]})["swapped"] == ["serving"]
    serving = ServingModel(model, cfg)
    assert not serving.traced
    b = _batches(cfg, sizes=(5,))[0]
    assert np.allclose(serving.predict_many(b), learner.predict_many(b), atol=0.05)
