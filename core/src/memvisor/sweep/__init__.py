"""Sweeps: run a base scenario under every combination of some varied settings and compare.

A sweep names a base scenario and *axes*, each a list of values for one setting addressed by a
dotted path (``vm.*.workload.alpha``, ``plugins.sharing.pages_per_tick``, ``seed``) or a list
of named bundles of settings (a *policy*). Every combination is one run: a pure function of its
resolved scenario, keyed by a hash of it, so no run is done twice and a stopped sweep resumes.
Runs go to Dask distributed (a LocalCluster sized to the machine, or an existing cluster); the
results are one row per run in a columnar table, every run's report.json, and index.html.

Modules: :mod:`~memvisor.sweep.spec` (sweep files and ``--vary``), :mod:`~memvisor.sweep.run`
(the run function), :mod:`~memvisor.sweep.driver` (serial and Dask execution, resume),
:mod:`~memvisor.sweep.table` (rows and the Parquet/CSV table), :mod:`~memvisor.sweep.compare`
(index.html). Dask is imported only when a cluster is used.
"""

from memvisor.sweep.driver import SweepSummary, run_sweep
from memvisor.sweep.run import RunOutcome, RunTask, run_one
from memvisor.sweep.spec import Axis, Compare, PlannedRun, SweepSpec, load_sweep, parse_vary, sweep_from_scenario
from memvisor.sweep.table import read_table

__all__ = [
    "Axis", "Compare", "PlannedRun", "RunOutcome", "RunTask", "SweepSpec", "SweepSummary", "load_sweep",
    "parse_vary", "read_table", "run_one", "run_sweep", "sweep_from_scenario",
]
