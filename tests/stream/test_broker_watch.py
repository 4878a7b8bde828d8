"""Broker resets are never silent (stream/broker_watch.py): the comparison that names a reset. The restart
of a real broker under running workers (every worker exits 75 with one line; ``--on-broker-reset reset``
starts over and ends with evaluate's numbers) is the ``broker_restart`` scenario of ``loopline chaos``
(tests/ops/test_chaos.py)."""

from __future__ import annotations

from loopline.stream.broker_watch import BrokerWatch


def test_the_comparison_names_the_sign_of_a_reset():
    same = {"cluster_id": "c1"}
    assert BrokerWatch.compare(None, same, {"events/0": 10}, {"events/0": 10}) is None
    assert "cluster id changed" in BrokerWatch.compare(same, {"cluster_id": "c2"}, {}, {})
    assert "events/1 ends at offset 3" in BrokerWatch.compare(same, same, {"events/1": 500}, {"events/1": 3})
    assert BrokerWatch.compare(same, same, {"events/1": 500}, {"events/1": 3}, slack=1000) is None
