"""Records written by earlier versions of kvmksm still load, report and give the same figures.

tests/fixtures/records/ holds real records, one folder each, written by the code of their
day (format1-*: commit 7f583a3, before the redesign: a tiny2 VM run and LTP's ksm03). Every
later version must read them; a format change adds a migration (results/record.py
MIGRATIONS), never breaks these.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kvmksm.analysis.metrics import analyse
from kvmksm.commands.compare import collect, compare
from kvmksm.results.record import FORMAT, load_record
from kvmksm.views.report import write_report

RECORDS = Path(__file__).parent / "fixtures" / "records"
ALL = sorted(p.name for p in RECORDS.iterdir())


@pytest.mark.parametrize("name", ALL)
def test_loads_and_reports(name: str, tmp_path: Path) -> None:
    copy = tmp_path / name
    shutil.copytree(RECORDS / name, copy)
    rec = load_record(copy)
    assert rec.meta.format <= FORMAT and rec.meta.status == "passed"
    assert len(rec.samples) > 3 and rec.events and rec.checks
    html = write_report(copy).read_text()
    assert "<svg" in html and rec.meta.scenario.name in html


def test_vm_record_gives_the_figures_it_was_written_with() -> None:
    """The VM run's figures, recomputed today, are the ones the old code stored in run.json;
    only the plateau window ends earlier now: at plateau_done (what a run measures after its
    plateau is kept out of it), which moves no figure of this record."""
    d = RECORDS / "format1-tiny2"
    stored = json.loads((d / "run.json").read_text())["metrics"]
    now = analyse(load_record(d)).metrics
    assert stored.keys() <= now.keys()
    for key, m in stored.items():
        if key == "plateau_window_s":
            assert now[key]["value"][0] == m["value"][0]  # starts at steady, as before
            assert now[key]["value"][1] < m["value"][1]
            continue
        assert now[key]["value"] == m["value"], key


def test_ksm03_record_figures_as_fixed() -> None:
    """LTP ksm03 by the old code: its report took the savings from the last 10% of the merge
    window (round 3's 98,303 pages), showed a (N-1)/N ceiling of 150 % for processes that
    repeat their content, and no ksmd CPU. Now the savings are the last fill's (98,302 pages,
    the exact count), the ceiling is not defined for processes, and ksmd's CPU while merging
    is given."""
    d = RECORDS / "format1-ltp-ksm03"
    a = analyse(load_record(d))
    assert a.value("plateau_saved_mib") == pytest.approx(98302 * 4096 / 2**20, abs=1e-4)
    assert a.value("ceiling_pct") is None and a.value("plateau_saved_pct_of_ceiling") is None
    assert a.value("ksmd_cpu_plateau_pct") is not None
    assert a.windows.where == "at the end of the last fill"


def test_old_records_compare_with_new_ones(tmp_path: Path) -> None:
    """compare reads an old record beside itself: the same figures, 'too few repeats'."""
    for i in (1, 2):
        shutil.copytree(RECORDS / "format1-tiny2", tmp_path / f"r{i}")
    cmp = compare(collect([tmp_path / "r1", tmp_path / "r2"]))
    assert len(cmp.groups) == 1 and len(cmp.groups[0].runs) == 2
