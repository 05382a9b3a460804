"""Statistics over repeats: mean and spread, and Welch's t-test with an interval for a
difference. Plain numbers in, plain numbers out. (Fits with prediction intervals: fit.py.)"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

MIN_REPEATS = 3  # per side, for the test to say anything
ALPHA = 0.05


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def difference(
    base: Sequence[float], other: Sequence[float], alpha: float = ALPHA
) -> dict[str, Any]:
    """other - base, with Welch's t-test over the repeats and a 95% interval of the difference
    (Welch's test does not assume the two spreads are equal)."""
    a, b = np.asarray(base, float), np.asarray(other, float)
    out: dict[str, Any] = {"diff": None, "diff_pct": None, "p": None, "ci95": None}
    if not len(a) or not len(b):
        return out | {"verdict": "no data"}
    diff = float(b.mean() - a.mean())
    out["diff"] = diff
    out["diff_pct"] = diff / abs(a.mean()) * 100 if a.mean() else None
    if len(a) < MIN_REPEATS or len(b) < MIN_REPEATS:
        return out | {
            "verdict": "too few repeats to tell",
            "why": f"{len(a)} and {len(b)} runs; the test needs {MIN_REPEATS} on each side",
        }
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va == 0 and vb == 0:  # exact counters: every repeat gave the same number
        same = diff == 0
        return out | {
            "verdict": "same" if same else "beyond noise",
            "why": "every repeat gave the same value on each side",
        }
    with warnings.catch_warnings():  # nearly equal values: scipy warns, the p is still fine
        warnings.simplefilter("ignore", RuntimeWarning)
        from scipy import stats  # here: scipy.stats takes a third of a second to import

        p = float(stats.ttest_ind(b, a, equal_var=False).pvalue)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (
        (va**2 / (len(a) - 1) if va else 0.0) + (vb**2 / (len(b) - 1) if vb else 0.0)
    )
    half = float(stats.t.ppf(0.975, df)) * se
    out.update(p=p, ci95=[diff - half, diff + half], df=df)
    beyond = p < alpha
    out["verdict"] = "beyond noise" if beyond else "within noise"
    out["why"] = f"Welch's t-test p={p:.3g} ({'<' if beyond else '>='} {alpha:g})"
    return out
