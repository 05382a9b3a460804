"""The HTML report: what it contains, that it is self-contained and a pure function of the
record, and that long records stay small."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from kvmksm.views.charts import MAX_POINTS, reduce_mean, reduce_minmax
from kvmksm.views.fmt import fmt_duration, fmt_expected, fmt_num
from kvmksm.views.report import write_report

from .recordgen import VmRun, ltp_record, vm_record

SECTIONS = ("summary", "checks", "charts", "metrics", "events", "host", "knobs", "scenario")


@pytest.fixture
def vm_report(tmp_path):
    d = vm_record(tmp_path / "vm")
    return write_report(d)


def card(html: str, key: str) -> str:
    m = re.search(rf'<div class="card" id="card-{key}"(.*?)</div>\s*</div>', html, re.S)
    assert m, key
    return re.sub(r"<[^>]+>", " ", m.group(0))


def test_written_beside_the_record(vm_report, tmp_path):
    assert vm_report == tmp_path / "vm" / "report.html"
    assert not list((tmp_path / "vm").glob("*.tmp"))


def test_sections_charts_and_per_vm_parts(vm_report):
    html = vm_report.read_text()
    for section in (*SECTIONS, "files", "definitions", "per-vm"):
        assert f'<section id="{section}">' in html, section
    assert html.count('<svg class="chart"') == 4  # merge, cost, memory, per VM
    for chart in ("merge", "cost", "memory", "vms"):
        assert f'id="chart-{chart}"' in html
    per_vm = html[html.index('<section id="per-vm">') : html.index('<section id="events">')]
    assert per_vm.count("<td>clone0") == 3  # one row per guest
    assert "sum of ksm_merging_pages" in per_vm


def test_headline_figures(vm_report):
    html = vm_report.read_text()
    assert re.search(r"250\s+MiB", card(html, "plateau_saved_mib"))
    assert re.search(r"32\.6\s+%", card(html, "plateau_saved_pct"))
    assert "of 768 MiB guest memory" in card(html, "plateau_saved_pct")
    assert re.search(r"48\.8\s+%", card(html, "plateau_saved_pct_of_ceiling"))
    assert re.search(r"100\s+s", card(html, "time_to_50pct_s"))
    assert re.search(r"180\s+s", card(html, "time_to_90pct_s"))
    assert re.search(r"115\s+CPU s", card(html, "ksmd_cpu_s"))
    assert re.search(r"2\.50\s+MiB/CPU s", card(html, "mib_per_cpu_s"))
    assert re.search(r"238\s+MiB", card(html, "general_profit_mib"))
    assert re.search(r"2\.50\s+s", card(html, "unmerge_s"))
    assert "configured 50,000 pages/s; 80 % of it achieved" in card(html, "scan_rate")


def test_every_metric_has_a_hover_and_a_footnote(vm_report):
    html = vm_report.read_text()
    metrics = json.loads((vm_report.parent / "run.json").read_text())["metrics"]
    assert metrics == {}  # the report computes; it does not write into the record
    ids = re.findall(r'<li id="def-(\w+)"', html)
    assert "plateau_saved_mib" in ids and "scan_rate_configured" in ids
    for key in ids[:-1]:
        assert f'href="#def-{key}"' in html, key
        row = re.search(rf'<tr id="metric-{key}"><td title="([^"]+)"', html)
        assert row and row.group(1).endswith("."), key


def test_self_contained(vm_report):
    html = vm_report.read_text()
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(//|[a-z]+:)""", html, re.I)
    assert "<script" not in html and "<link" not in html and "@import" not in html
    assert re.findall(r'href="([^"#]+)"', html) == ["samples.csv", "vm_samples.csv", "run.json"]


def test_side_channel_note_said_once(vm_report):
    from kvmksm.security import SIDE_CHANNEL_NOTE

    html = vm_report.read_text()
    assert html.count("known side channel") == 1 and "Flip Feng Shui" in html
    assert SIDE_CHANNEL_NOTE.split(":")[0] in html


def test_svg_ids_are_unique_across_charts(vm_report):
    ids = re.findall(r'\sid="([^"]+)"', vm_report.read_text())
    # every chart of a VM run has ids of its own (prefixed by its name), and none repeats
    charts = {i.rsplit("-", 1)[0] for i in ids if re.fullmatch(r"[a-z-]+-\d+", i)}
    assert {"merge", "cost", "memory", "vms"} <= charts, charts
    assert len(ids) == len(set(ids))


def test_rebuilt_report_is_identical(vm_report, tmp_path):
    first = vm_report.read_bytes()
    assert write_report(vm_report.parent).read_bytes() == first
    copy = tmp_path / "copy"
    shutil.copytree(vm_report.parent, copy)
    (copy / "report.html").unlink()
    assert write_report(copy).read_bytes() == first


def test_record_without_vm_samples_leaves_per_vm_out(tmp_path):
    html = write_report(ltp_record(tmp_path / "ltp")).read_text()
    assert 'id="per-vm"' not in html and "Per VM" not in html
    assert html.count('<svg class="chart"') == 3
    assert "12/12 passed" in html
    assert "3 processes x 128 MiB" in html
    # what cannot be computed says why, truthfully: the record's kernel (6.1.0-test) has
    # general_profit, the synthetic record simply did not sample it; pages_scanned is newer
    assert "no general_profit column in this record (Linux has it from 6.1 on)" in html
    assert "this kernel (6.1.0-test) has no pages_scanned: it appeared in Linux 6.7" in html
    assert re.search(r'id="card-scan_rate".*?<div class="value none">—', html, re.S)
    # the (N-1)/N ceiling means nothing for processes that repeat their content: no card
    assert 'id="card-plateau_saved_pct_of_ceiling"' not in html
    assert 'id="card-plateau_saved_mib"' in html and "at the end of the last fill" in html
    # the exact checks marked on the merge chart where they were taken
    assert "check passed" in html and "check FAILED" not in html


def test_failed_run_shows_status_and_escaped_error(tmp_path):
    d = vm_record(tmp_path / "bad", status="error", with_vm=False)
    run = json.loads((d / "run.json").read_text())
    run["error"] = "guest clone02 never came up <script>alert(1)</script>"
    (d / "run.json").write_text(json.dumps(run))
    html = write_report(d).read_text()
    assert 'class="badge bad" id="status">error<' in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html


def test_record_without_samples_still_renders(tmp_path):
    d = vm_record(tmp_path / "empty", with_vm=False)
    (d / "samples.csv").write_text("t,time,pages_shared,pages_sharing\n")
    html = write_report(d).read_text()
    assert "nothing to chart" in html and "<svg" not in html


def test_long_record_is_reduced(tmp_path):
    # 6 hours at 1 Hz with a one-second ksmd spike that must survive the reduction
    d = vm_record(
        tmp_path / "long", VmRun(duration=6 * 3600.0, rise=3600.0, steady=None, unmerge=None)
    )
    s = (d / "samples.csv").read_text().splitlines()
    s[7000] = re.sub(r",50.0,", ",97.5,", s[7000])  # the spike, inside the rise
    (d / "samples.csv").write_text("\n".join(s) + "\n")
    html = write_report(d).read_text()
    assert len(html) < 1_500_000
    assert "time since run start (h)" in html
    assert re.search(r"Time to 50% of the savings.*?1,800\s+s", html, re.S)


def test_reduce_minmax_keeps_peaks_and_bounds_points():
    x = np.arange(86400.0)
    y = np.zeros_like(x)
    y[12345], y[54321] = 100.0, -5.0
    xs, ys = reduce_minmax(x, y)
    assert len(xs) <= MAX_POINTS + 2
    assert ys.max() == 100.0 and xs[ys.argmax()] == 12345
    assert ys.min() == -5.0 and xs[ys.argmin()] == 54321
    assert np.all(np.diff(xs) > 0)
    assert reduce_minmax(x[:10], y[:10])[0] is x[:10] or len(reduce_minmax(x[:10], y[:10])[0]) == 10


def test_reduce_mean_averages_buckets():
    x = np.arange(1000.0)
    ys = np.column_stack([np.ones(1000), np.arange(1000.0)])
    xs, ms = reduce_mean(x, ys, buckets=10)
    assert len(xs) == 10 and np.all(ms[:, 0] == 1.0)
    assert ms[0, 1] == np.mean(np.arange(100.0))


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "—"),
        (98302, "98,302"),
        (250.0, "250"),
        (32.552, "32.6"),
        (2.5, "2.50"),
        (0.05, "0.050"),
    ],
)
def test_number_format(value, text):
    assert fmt_num(value) == text


def test_expected_format():
    assert fmt_expected({"min": 32000, "max": None}) == "≥ 32,000"
    assert fmt_expected({"min": 1, "max": 5}) == "1 … 5"
    assert fmt_expected(98302) == "98,302"


def test_cli_report_subcommand(tmp_path):
    d = vm_record(tmp_path / "cli", with_vm=False)
    out = subprocess.run(
        [sys.executable, "-m", "kvmksm", "report", str(d)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert (d / "report.html").is_file()
    assert str(d / "report.html") in out.stdout


def test_duration_format():
    assert fmt_duration(86399.0) == "86,399 s (23 h 59 min)"
    assert fmt_duration(700.0) == "700 s (11 min 40 s)"
    assert fmt_duration(14) == "14 s" and fmt_duration(None) == "—"


def test_single_sample_record_renders_without_warnings(tmp_path):
    # events far outside a one-sample time axis must not push the layout apart
    d = vm_record(tmp_path / "one")
    samples = (d / "samples.csv").read_text().splitlines()
    (d / "samples.csv").write_text("\n".join(samples[:2]) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        html = write_report(d).read_text()
    assert html.count('<svg class="chart"') == 4
