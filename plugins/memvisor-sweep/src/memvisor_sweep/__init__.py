"""Sweeps: run a base scenario under every combination of some varied settings and compare.

A sweep names a base scenario and *axes*, each a list of values for one setting addressed by a
dotted path (``vm.*.workload.alpha``, ``plugins.sharing.pages_per_tick``, ``seed``) or a list
of named bundles of settings (a *policy*). Every combination is one run: a pure function of its
resolved scenario, keyed by a hash of it, so no run is done twice and a stopped sweep resumes.
Runs go to Dask distributed (a LocalCluster sized to the machine, or an existing cluster); the
results are one row per run in a columnar table, every run's report.json, and index.html.

Modules: :mod:`~memvisor_sweep.spec` (sweep files and ``--vary``), :mod:`~memvisor_sweep.run`
(the run function), :mod:`~memvisor_sweep.driver` (serial and Dask execution, resume),
:mod:`~memvisor_sweep.table` (rows and the Parquet/CSV table), :mod:`~memvisor_sweep.compare`
(index.html), :mod:`~memvisor_sweep.plugin` (the ``memvisor sweep`` command and ``memvisor
bench sweep``, registered like any plugin's). Dask is imported only when a cluster is used, and
this package loads its modules when they are first used: every ``memvisor`` command loads the
plugin.

This distribution was ``memvisor.sweep`` inside the core until the core stopped naming its
plugins; ``pip install "memvisor-sweep[dask]"`` (``requirements-all.txt`` installs it).
"""

from importlib import import_module

_EXPORTS = {
    "SweepSummary": "driver", "run_sweep": "driver", "RunOutcome": "run", "RunTask": "run", "run_one": "run",
    "Axis": "spec", "Compare": "spec", "PlannedRun": "spec", "SweepSpec": "spec", "load_sweep": "spec",
    "parse_vary": "spec", "sweep_from_scenario": "spec", "read_table": "table",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"memvisor_sweep.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
