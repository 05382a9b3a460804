"""A report opened in real headless Chromium: no errors, nothing fetched, charts drawn."""

from __future__ import annotations

import shutil
import struct

import pytest

from kvmksm.views.report import write_report

from .browser import CHROMIUM, visit
from .recordgen import ltp_record, vm_record

pytestmark = pytest.mark.browser

# Every chart's drawn size, every section, and whether any image or font failed to load.
PROBE = """(() => {
  const charts = [...document.querySelectorAll('svg.chart')].map(s => {
    const r = s.getBoundingClientRect();
    return {label: s.getAttribute('aria-label'), width: r.width, height: r.height,
            paths: s.querySelectorAll('path').length, texts: s.querySelectorAll('text').length};
  });
  return {
    title: document.title,
    charts,
    sections: [...document.querySelectorAll('section')].map(s => s.id),
    status: document.getElementById('status').textContent,
    cards: document.querySelectorAll('.card').length,
    scrollWidth: document.documentElement.scrollWidth,
  };
})()"""


def png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.fixture
def profile(tmp_path):
    if shutil.which(CHROMIUM) is None:  # fail, not skip: a missing browser is a broken setup
        pytest.fail(f"{CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium")
    return tmp_path / "chromium-profile"  # a fresh one each test


def test_vm_report_renders_cleanly(tmp_path, profile):
    report = write_report(vm_record(tmp_path / "vm"))
    shot = tmp_path / "report.png"
    page = visit(report.as_uri(), profile, PROBE, screenshot=shot, width=1280)

    assert page.console == []
    assert page.log == []
    assert page.requests == [report.as_uri()]  # the file itself and nothing else
    facts = page.facts
    assert facts["title"] == "KSM report: tiny-vms on testhost"
    assert facts["status"] == "passed"
    assert facts["cards"] == 10
    assert "per-vm" in facts["sections"] and "definitions" in facts["sections"]
    labels = [c["label"] for c in facts["charts"]]
    assert labels == ["Merge curves", "ksmd CPU and scan rate", "Host memory"] + [
        "Merged memory per guest"
    ]
    for chart in facts["charts"]:
        assert chart["width"] > 900 and chart["height"] > 250, chart  # drawn, full width
        assert chart["paths"] > 20 and chart["texts"] > 10, chart  # lines, axes and labels
    assert facts["scrollWidth"] <= 1280  # nothing wider than the window

    width, height = png_size(shot)
    assert width == 1280 and height > 4000  # the whole page
    assert shot.stat().st_size > 100_000  # not a blank page


def test_processes_report_renders_cleanly(tmp_path, profile):
    report = write_report(ltp_record(tmp_path / "ltp"))
    page = visit(report.as_uri(), profile, PROBE, screenshot=tmp_path / "ltp.png")
    assert page.console == [] and page.log == []
    assert page.requests == [report.as_uri()]
    assert len(page.facts["charts"]) == 3
    assert "per-vm" not in page.facts["sections"]


def test_the_probe_sees_errors_and_fetches(tmp_path, profile):
    """The checks above would catch a broken page: a script error and a network image."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<title>bad</title><img src="http://example.invalid/x.png">'
        "<script>console.error('boom'); missing();</script>"
    )
    page = visit(bad.as_uri(), profile, "({title: document.title})")
    assert any("boom" in c for c in page.console)
    assert any("missing" in c for c in page.console)
    assert "http://example.invalid/x.png" in page.requests
