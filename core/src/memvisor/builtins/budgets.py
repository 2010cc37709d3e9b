"""The report's "Budgets" section: each VM's trap-rate, scan-rate and migration-bandwidth
budget against what it used (:mod:`memvisor.budgets`)."""

from __future__ import annotations

from memvisor import hookimpl


class CoreBudgets:
    """Reports the per-VM resource budgets and registers their benchmark."""

    @hookimpl
    def memvisor_report(self, host):
        """One section: per VM its budget, traps served, peak trap rate, batches throttled and
        time waited, pages scanned and refused, migration bytes and time added by the budget;
        a plot of each VM's trap rate over time."""
        from memvisor.report import Plot, ReportSection

        uses = host.budgets.vms
        if not uses:
            return None
        series = {}
        for name, use in uses.items():
            if use.trap_series and use.traps:
                times, rates = zip(*use.trap_series)
                series[f"{name} traps/s"] = (list(times), list(rates))
                if use.budget.trap_rate is not None:
                    series[f"{name} budget"] = ([times[0], times[-1]], [use.budget.trap_rate] * 2)
        plots = [Plot("trap_rates", "Traps served per second, by VM", "time (s)", "traps per second", series,
                      kind="step")] if series else []
        limited = any(u.budget != type(u.budget)() for u in uses.values())
        return ReportSection(
            "memvisor", "Budgets", {"vms": {name: use.to_json() for name, use in uses.items()},
                                    "any_budget": limited,
                                    "handler_threads": host.config.handler_threads},
            plots=plots,
            text="Each VM's share of the host's trap handler, content scanners and network, against its budget "
                 "(None: unlimited). A VM past its trap budget waits until it is paid back, so a guest "
                 "trapping in a loop cannot take the handler from the others (docs/reliability.md).")


    @hookimpl
    def memvisor_register_benchmarks(self, register):
        """``memvisor bench budgets``: the VMs beside a guest that traps in a loop, with and
        without its trap budget, and what accounting budgets costs."""
        from memvisor.bench_budgets import cases

        for case in cases():
            register("budgets", case)


PLUGIN = CoreBudgets
