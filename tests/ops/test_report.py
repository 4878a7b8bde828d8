"""``loopline report`` writes an HTML page whose plots load in a real browser (headless Chromium)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from loopline.ops.generate import GenerateConfig, write_log

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images", imgs.length + ":" + ok);
});
</script></body>"""


def _chromium(*args, timeout=90):
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=10000", *args], capture_output=True, text=True, timeout=timeout)


def _images_loaded(index: str) -> tuple[int, int]:
    """(images on the page, images that loaded with a width), by the page's own load event."""
    probe = os.path.join(os.path.dirname(index), "probe.html")
    with open(index, encoding="utf-8") as f:
        page = f.read()
    with open(probe, "w", encoding="utf-8") as f:
        f.write(page.replace("</body>", CHECK))
    dom = _chromium("--dump-dom", "file://" + probe).stdout
    m = re.search(r'data-images="(\d+):(\d+)"', dom)
    assert m, f"no load result in the DOM: {dom[-500:]}"
    return int(m.group(1)), int(m.group(2))


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    log = tmp / "events.jsonl"
    write_log(GenerateConfig(users=100, days=2, seed=7, malformed=0.01), str(log))
    out = tmp / "report"
    r = subprocess.run([sys.executable, "-m", "loopline.ops.cli", "report", "--events", str(log), "--out", str(out),
                        "--every", "21600", "--variants", "base,loopfm", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return str(out), json.loads(r.stdout)


def test_report_writes_the_page_the_plots_and_the_evaluation_table(report_dir):
    out, summary = report_dir
    assert sorted(os.listdir(out)) >= ["alarms.png", "drift.png", "health.png", "index.html", "report.json", "transfer.png"]
    page = open(os.path.join(out, "index.html"), encoding="utf-8").read()
    for model in ("fm", "lr", "vm:base", "vm:loopfm"):
        assert f"<td>{model}</td>" in page
        assert model in summary["models"]
    for png in summary["images"]:
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["monitor"]["health"]["windows"] and report["monitor"]["drift"]["examples"] > 0
    assert "scores" not in report["evaluation"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed (/usr/bin/chromium)")
def test_report_images_load_in_headless_chromium(report_dir, tmp_path):
    out, summary = report_dir
    assert _images_loaded(os.path.join(out, "index.html")) == (4, 4)
    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", "--window-size=1100,4200", "file://" + os.path.join(out, "index.html"))
    assert shot.stat().st_size > 50_000  # a page with plots, not a blank one
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    os.remove(broken / "drift.png")
    assert _images_loaded(str(broken / "index.html")) == (4, 3)  # the check sees a missing plot
