"""Analysis: pure functions of run records. Windows (merge, plateau), metrics, per-guest
figures, statistics, steady-state detection, Pareto fronts."""
