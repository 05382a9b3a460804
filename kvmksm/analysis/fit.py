"""Straight lines fitted by ordinary least squares, with prediction intervals (statsmodels).

A prediction interval says where one more run at x would land, with the given confidence: it
holds the uncertainty of the line (from the spread of the measured points around it, repeats
included) and the run-to-run scatter of a single new run. It needs more runs than the line
has parameters; with exactly as many (two runs, two counts) the line passes through every
point, says nothing about the scatter, and no interval is given.

A fit may set ``rel_floor``: its intervals are then never narrower than that fraction of the
value either side. Runs that agree to the page (deterministic guests) give a scatter near zero
and an interval of a MiB, yet a line through three counts still misses a larger count by a
few tenths of a percent (pages the line cannot see, e.g. each guest's page tables): the
floor keeps the interval from promising what no run can check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from statsmodels.regression.linear_model import OLS

LEVEL = 0.95  # of every prediction interval kvmksm shows


@dataclass
class LineFit:
    """y = intercept + slope * x (slope 0 for a mean alone), as statsmodels fitted it."""

    slope: float
    intercept: float
    r2: float | None  # None when it says nothing: y constant, or no residual degree of freedom
    runs: int
    df_resid: int
    level: float
    _result: Any  # statsmodels' RegressionResults
    _constant_only: bool
    rel_floor: float = 0.0  # intervals at least this fraction of the value either side

    @property
    def has_interval(self) -> bool:
        return self.df_resid > 0

    @property
    def resid_sd(self) -> float | None:
        """The scatter of the runs around the line (residual standard error)."""
        return float(np.sqrt(self._result.scale)) if self.has_interval else None

    def predict(self, x: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, lower, upper) at each x: the line, and the bounds of the prediction
        interval for one new run there (NaN without an interval)."""
        xs = np.atleast_1d(np.asarray(x, float))
        exog = (
            np.ones((len(xs), 1))
            if self._constant_only
            else np.column_stack([np.ones_like(xs), xs])
        )
        mean = self.intercept + self.slope * xs
        if not self.has_interval:
            nan = np.full(len(xs), np.nan)
            return mean, nan, nan
        frame = self._result.get_prediction(exog).summary_frame(alpha=1 - self.level)
        mean = frame["mean"].to_numpy(float)
        floor = self.rel_floor * np.abs(mean)
        return (
            mean,
            np.minimum(frame["obs_ci_lower"].to_numpy(float), mean - floor),
            np.maximum(frame["obs_ci_upper"].to_numpy(float), mean + floor),
        )

    def at(self, x: float) -> tuple[float, float | None, float | None]:
        mean, lo, hi = self.predict([x])
        return (
            float(mean[0]),
            None if np.isnan(lo[0]) else float(lo[0]),
            None if np.isnan(hi[0]) else float(hi[0]),
        )


def fit_line(
    x: Sequence[float],
    y: Sequence[float],
    constant_only: bool = False,
    level: float = LEVEL,
    rel_floor: float = 0.0,
) -> LineFit:
    """Least squares of y on x (or on a constant alone: the mean, with its interval)."""
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    exog = np.ones((len(xa), 1)) if constant_only else np.column_stack([np.ones_like(xa), xa])
    result = OLS(ya, exog).fit()
    params = np.asarray(result.params, float)
    intercept, slope = (
        (float(params[0]), 0.0) if constant_only else (float(params[0]), float(params[1]))
    )
    df = int(round(result.df_resid))
    sst = float(((ya - ya.mean()) ** 2).sum())
    # With no residual degree of freedom R² is 1 by construction; with y constant, 0/0.
    r2 = None if constant_only or df == 0 or sst == 0 else float(result.rsquared)
    return LineFit(slope, intercept, r2, len(ya), df, level, result, constant_only, rel_floor)
