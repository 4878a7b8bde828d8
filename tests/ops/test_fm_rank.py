"""``loopline fm-rank``: a rank started apart joins rank 0 (``--fm-join``) and the run is the launched one's."""

import json
import socket
import subprocess
import sys

import pytest

from loopline.ops.cli import main
from loopline.ops.generate import GenerateConfig, generate_labelled


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_started_apart_joins_evaluate_and_gives_the_launched_ranks_numbers(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"".join(x + b"\n" for x, _ in generate_labelled(GenerateConfig(users=200, days=2, seed=1))))
    base = ["evaluate", "--events", str(log), "--json", "--variants", "none", "--fm-ranks", "2"]
    assert main(base) == 0
    launched = json.loads(capsys.readouterr().out)
    master = f"127.0.0.1:{_free_port()}"
    rank1 = subprocess.Popen([sys.executable, "-m", "loopline.ops.cli", "fm-rank", "--rank", "1", "--fm-ranks", "2",
                              "--fm-master", master], stderr=subprocess.PIPE)
    try:
        assert main(base + ["--fm-join", "--fm-master", master]) == 0
        assert rank1.wait(timeout=60) == 0, rank1.stderr.read()[-3000:]  # stopped by rank 0 at the end
    finally:
        rank1.kill()
    joined = json.loads(capsys.readouterr().out)
    assert joined["fm_stage"]["ranks"] == 2 and joined["models"]["fm"] == launched["models"]["fm"]


@pytest.mark.parametrize("args, field", [(["--fm-ranks", "1", "--fm-master", "127.0.0.1:1"], "fm_ranks"),
                                         (["--rank", "3", "--fm-ranks", "2", "--fm-master", "127.0.0.1:1"], "rank"),
                                         (["--fm-ranks", "2", "--fm-master", "nohost"], "fm_master"),
                                         (["--fm-ranks", "2"], "fm_master")])  # port 0: nobody to tell it to
def test_a_bad_fm_rank_setting_is_one_line_naming_the_field(capsys, args, field):
    assert main(["fm-rank", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ConfigError: " + field) and "\n" not in err
