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
        plots of each VM's trap rate and share of the handler's time over time."""
        import numpy as np

        from memvisor.report import Plot, ReportSection

        uses = host.budgets.vms
        if not uses:
            return None
        rates, handler = {}, {}
        for name, use in uses.items():
            if use.trap_series and use.traps:
                times, rate, seconds = (list(column) for column in zip(*use.trap_series))
                took = np.cumsum(seconds).tolist()  # handler time taken so far: its slope is the share
                rates[name] = (times, rate)
                if use.handler_s > took[-1]:  # handler work after the last tick: the run's end
                    took.append(use.handler_s)
                    times = [*times, max(host.now, times[-1])]
                handler[name] = (times, took)
                # one line per budget value: VMs under the host's default share it
                if use.budget.trap_rate is not None:
                    rates.setdefault(f"budget {use.budget.trap_rate:g}/s",
                                     ([times[0], times[-1]], [use.budget.trap_rate] * 2))
                if use.budget.handler_share is not None:
                    share = use.budget.handler_share
                    handler.setdefault(f"budget {share:g} of the handler",
                                       (times, [share * (t - times[0]) for t in times]))
        plots = []
        if rates:
            plots.append(Plot("trap_rates", "Traps served per second, by VM", "time (s)", "traps per second",
                              rates, kind="step",
                              shows="Each VM's traps per second over each tick interval (its highest: the "
                                    "table's peak trap rate), and the trap-rate budgets."))
        if any(ys[-1] > 0 for name, (_, ys) in handler.items() if not name.startswith("budget")):
            plots.append(Plot("handler_time", "Trap handler time taken so far, by VM", "time (s)",
                              "handler seconds", handler,
                              ends_at={name: ("vms", name, "handler_s") for name in handler if name in uses},
                              shows="A budget's line is the handler time its share allows since the first tick."))
        limited = any(u.budget != type(u.budget)() for u in uses.values())
        headlines = [_headline(name, use) for name, use in uses.items() if use.budget != type(use.budget)()]
        return ReportSection(
            "memvisor", "Budgets", {"vms": {name: use.to_json() for name, use in uses.items()},
                                    "any_budget": limited,
                                    "handler_threads": host.config.handler_threads},
            plots=plots, headlines=headlines, tables=[_table(limited)],
            text="Each VM's use of the host's trap handler, content scanners and network, against its budget "
                 "(null in report.json: unlimited). A VM's batches stop at the first trap its trap or handler "
                 "budget cannot pay, and it waits until the budget refills, so a guest trapping in a loop cannot "
                 "take the handler from the others (waited: time waited for its budget; queued: time its traps "
                 "waited behind other VMs' in the handler; docs/reliability.md).")

    @hookimpl
    def memvisor_register_benchmarks(self, register):
        """``memvisor bench budgets``: the VMs beside a guest that traps in a loop, with and
        without its trap budget, and what accounting budgets costs."""
        from memvisor.bench_budgets import cases

        for case in cases():
            register("budgets", case)


def _headline(name: str, use):
    """What a VM's budget did to it: throttled batches and time waited, or never throttled;
    and the time its traps queued behind other VMs' in the handler."""
    from memvisor.report import Figure, Headline

    queued = Figure(("vms", name, "handler_wait_s"), "s", "lower", "queued behind other VMs")
    if not use.throttled_batches and not use.waited_s:
        return Headline("budgets: never throttled; its traps waited {queued} behind other VMs'", {"queued": queued},
                        vm=name)
    return Headline("budgets: batches throttled: {throttled}, waiting {waited} for its budget; its traps waited "
                    "{queued} behind other VMs'",
                    {"throttled": Figure(("vms", name, "throttled_batches"), "count"),
                     "waited": Figure(("vms", name, "waited_s"), "s", label="waited for its budget"),
                     "queued": queued}, vm=name)


def _table(limited: bool):
    """The VMs' budgets and use; without any budget, only the use that matters then (the
    handler's time and its queue)."""
    from memvisor.report import Column, Table

    unlimited = "unlimited"
    use = [Column("guest_traps", "guest traps", "count"), Column("peak_trap_rate", "peak trap rate", "per_s"),
           Column("handler_s", "handler time", "s", help="trap handler time its traps took"),
           Column("handler_wait_s", "queued", "s", help="time its traps waited behind other VMs' in the handler")]
    if not limited:
        return Table("Trap handler use (no budget set)", use, rows=("vms",))
    budget = [Column(("budget", "trap_rate"), "trap budget", "per_s", unlimited),
              Column(("budget", "trap_burst"), "burst", "count", unlimited),
              Column(("budget", "handler_share"), "handler share", "fraction", unlimited),
              Column(("budget", "scan_rate"), "scan budget", "per_s", unlimited, help="pages per second"),
              Column(("budget", "migration_bandwidth"), "migration budget", "bytes/s", unlimited)]
    more = [Column("throttled_batches", "throttled batches", "count"),
            Column("waited_s", "waited", "s", help="time waited for its budget"),
            Column("scan_pages", "pages scanned", "count"), Column("scan_refused", "scans refused", "count"),
            Column("migration_bytes", "migration sent", "bytes"),
            Column("migration_limited_s", "migration slowed", "s", help="time the bandwidth budget added")]
    return Table("Budgets and use", budget + use[:2] + more[:2] + use[2:] + more[2:], rows=("vms",))


PLUGIN = CoreBudgets
