"""Running a scenario: build the host and VMs, perform the timeline, collect the report."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from memvisor.backend import AccessResult, Capability
from memvisor.errors import BackendError, GuestDied, ScenarioError, UserError
from memvisor.files import temp_dir
from memvisor.host import VM, Host
from memvisor.pacing import Pacing
from memvisor.report import Report
from memvisor.scenario import Scenario, Table

log = structlog.get_logger("memvisor.runner")

Progress = Callable[[float, str], None]
"""``progress(fraction_done, description)``."""


class Step(Table):
    """One ``[[timeline]]`` step: its table with checked access, and the VMs it names."""

    def __init__(self, run: ScenarioRun, index: int, data: dict):
        super().__init__(run.scenario.path, f"timeline[{index}]", data)
        self.run = run
        self.index = index
        self.action = self.get("do", str)

    def vm(self, name: str = "vm") -> VM:
        """The VM named by key ``name``."""
        vm_name = self.get(name, str)
        if vm_name not in self.run.host.vms:
            names = list(self.run.host.vms)
            shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            raise self.error(name, f"no VM named {vm_name[:60]!r} (VMs: {shown})")
        return self.run.host.vms[vm_name]

    def span(self, name: str, default=...) -> float | None:
        """A duration the host runs through (``for``): at most
        :data:`~memvisor.limits.MAX_TICKS` ticks of the host's tick interval."""
        from memvisor.limits import MAX_TICKS

        seconds = self.duration(name, default)
        if seconds is not None and seconds is not default and seconds / self.run.host.tick_interval > MAX_TICKS:
            raise self.error(name, f"{self.data[name]!r} is more than {MAX_TICKS:,} ticks of "
                                   f"{self.run.host.tick_interval:g} s")
        return seconds

    def vms(self, name: str = "vms") -> list[VM]:
        """The VMs named by key ``name`` (a list of names), or every VM when it is absent."""
        names = self.get(name, list, None)
        if names is None:
            return list(self.run.host.vms.values())
        if not all(isinstance(n, str) for n in names):
            raise self.error(name, "must be a list of VM names")
        missing = [n for n in names if n not in self.run.host.vms]
        if missing:
            raise self.error(name, f"no VM named {str(missing[0])[:60]!r}")
        return [self.run.host.vms[n] for n in names]


class ScenarioRun:
    """A scenario being run: the host, each VM's workload, and the guest loop.

    :param scenario: the checked scenario.
    :param progress: called with the fraction of the timeline done (by time) and a description.
    :param extra_plugins: plugin objects to register beside the scenario's (tests).
    """

    def __init__(self, scenario: Scenario, progress: Progress | None = None, extra_plugins=()):
        self.scenario = scenario
        self.progress = progress or (lambda fraction, description: None)
        try:
            self.host = Host(scenario.host, list(scenario.plugins), extra_plugins=extra_plugins)
        except UserError as exc:
            raise UserError(f"{scenario.path}: {exc}") from None
        self.workloads: dict[str, Any] = {}
        # Files a run makes (checkpoints) live in a private folder removed when the run ends
        # (on SIGTERM too; one left by a killed run is removed by the next).
        self._workdir = temp_dir("run")
        self.workdir = Path(self._workdir.name)
        self.checkpoints: dict[str, str] = {}
        self._clocks: dict[str, float] = {}  # each VM's clock: when its last batch ended
        self._pending: dict[str, tuple] = {}  # the rest of a batch cut at a VM's trap budget
        try:
            for index, spec in enumerate(scenario.vms):
                self._create(index, spec)
        except BaseException:
            self._workdir.cleanup()
            raise
        self.pacing = Pacing(self.host)  # batches on a real clock
        self._planned = sum(_step_seconds(s) for s in scenario.timeline) or 1.0
        self._done = 0.0

    def _create(self, index: int, spec) -> None:
        """Create the scenario's VM ``vm[index]``: one line naming the file and the VM when it
        cannot be made (the host's memory is full, its disk image is missing...)."""
        where = f"vm[{index}]"
        try:
            vm = self.host.create_vm(spec.name, spec.pages, home_node=spec.node, large_pages=spec.large_pages,
                                     contents=spec.contents, seed=spec.seed, budget=spec.budget)
            if spec.disk:
                disk = self.host.attach_disk(vm, spec.disk["path"], blocks=spec.disk["blocks"],
                                             contents=spec.disk["contents"], seed=spec.disk["seed"])
                if spec.disk["page_cache"]:
                    self.host.fill_page_cache(vm, disk, spec.disk["page_cache"])
        except (UserError, BackendError) as exc:
            raise ScenarioError(self.scenario.path, where, f"VM {spec.name!r}: {exc}") from None
        if spec.workload:
            self.workloads[vm.name] = self.make_workload(spec.workload, vm, f"{where}.workload")

    def make_workload(self, spec: dict, vm: VM, where: str):
        """Build a workload from its scenario table for ``vm`` (the rest of a batch of its
        previous workload, cut at its trap budget, is dropped with it)."""
        self._pending.pop(vm.name, None)
        registry = self.host.registries["workload"]
        kind = spec.get("kind")
        if kind not in registry:
            raise ScenarioError(self.scenario.path, f"{where}.kind",
                                f"unknown workload {repr(kind)[:60]} (known: {', '.join(registry)})")
        try:
            workload = registry[kind](dict(spec), vm.pages, vm.seed)
            if hasattr(workload, "bind_disk"):  # a workload that does disk I/O (pagecache)
                workload.bind_disk(self.host.disk(vm, getattr(workload, "disk", None)))
        except (UserError, BackendError) as exc:
            raise ScenarioError.within(self.scenario.path, f"{where}: {exc}") from None
        return workload

    # -- the guest loop -----------------------------------------------------------------------

    def run_guests(self, seconds: float | None = None, accesses: int | None = None,
                   vms: list[VM] | None = None) -> None:
        """Run the VMs' workloads until ``seconds`` of time have passed or ``accesses`` accesses
        were made (per VM), or every workload is exhausted.

        Each VM runs on its own virtual CPUs with its own clock: the VM whose clock is earliest
        runs its next batch, and time passes to it (ticks fire on the way). Batches' trap work
        shares the host's trap handler (``handler_threads``): a batch that traps waits for the
        handler to finish the trap work queued before it — how a guest trapping in a loop would
        starve the others — unless that guest has a trap budget (:mod:`memvisor.budgets`): then
        its batches are cut to the traps it may take, and it waits while it is in debt.

        On a real clock a batch takes real time by itself: VMs run their batches in turn, each
        cut to what its recent costs fit in half a tick interval (:mod:`memvisor.pacing`), so
        that ticks fire at their interval between batches and the step ends on time.
        """
        host = self.host
        running = {vm.name: vm for vm in (vms or host.vms.values()) if vm.name in self.workloads}
        start = host.now
        end = None if seconds is None else start + seconds
        made = dict.fromkeys(running, 0)
        clock = {name: max(start, self._clocks.get(name, start)) for name in running}
        handler = [start] * host.config.handler_threads  # when each handler thread is free
        # On a real clock the handler's work already took its time while the batch ran.
        virtual = Capability.VIRTUAL_TIME in host.backend.capabilities
        pacing = None if virtual else self.pacing

        def ready(name: str) -> float:
            at = max(clock[name], host.budgets.ready_at(running[name]))
            # On a real clock every VM that can run has come to now: the one that waited
            # longest (its last batch ended first) goes next.
            return max(at, host.now) if virtual else at

        while running:
            name = min(running, key=ready)
            vm, at = running[name], max(ready(name), host.now)
            if (vm.name not in host.vms or (end is not None and at >= end)
                    or (accesses is not None and made[name] >= accesses)):
                del running[name]  # destroyed meanwhile, or done
                continue
            if at > host.now:
                host.wait_until(at)
                self._report_progress(host.now - start)
            size = self.scenario.batch if accesses is None else min(self.scenario.batch, accesses - made[name])
            step = self._next_step(name, size if pacing is None else pacing.size(vm, size))
            if step is None:
                del running[name]
                continue
            if pacing is not None and not hasattr(self.workloads[name], "take_io"):  # I/O batches run whole
                step = self._keep_rest(name, step, pacing.cut(vm, step[0], step[1]))
            result, seconds_taken = self._run_batch(vm, step)
            made[name] += result.accesses
            self._keep_rest(name, step, result.accesses)  # cut at the VM's trap budget: the rest comes next
            if pacing is not None:  # the batch took its time: ticks due meanwhile fire now
                pacing.learn(vm, result, seconds_taken)
                clock[name] = host.now
                host.wait_until(host.now)
                continue
            wait = 0.0
            if result.handler_seconds:  # its traps queue behind the others' trap work
                thread = min(range(len(handler)), key=handler.__getitem__)
                wait = max(0.0, handler[thread] - host.now)
                handler[thread] = max(handler[thread], host.now) + result.handler_seconds
                host.budgets.record_handler_wait(vm, wait)
            clock[name] = host.now + seconds_taken + wait
        self._clocks.update(clock)
        target = end if end is not None else max(clock.values(), default=host.now)
        host.wait_until(target)  # time passes to the end (or the last batch's end)
        self._done += host.now - start
        self._report_progress(0.0)

    def _next_step(self, name: str, size: int):
        """The next ``size`` accesses of ``name``: the rest of a batch cut earlier first, else
        a new batch of its workload (None when it is exhausted)."""
        step = self._pending.pop(name, None)
        if step is None:
            return self.workloads[name].next_batch(size)
        return self._keep_rest(name, step, size)

    def _keep_rest(self, name: str, step, keep: int):
        """Keep the accesses of ``step`` after the first ``keep`` for ``name``'s next batch
        (before any kept earlier); returns the first ``keep``."""
        if keep >= len(step[0]):
            return step
        rest = (step[0][keep:], step[1][keep:])
        later = self._pending.pop(name, None)
        if later is not None:
            rest = (np.concatenate([rest[0], later[0]]), np.concatenate([rest[1], later[1]]))
        self._pending[name] = rest
        return step[0][:keep], step[1][:keep]

    def _run_batch(self, vm: VM, step) -> tuple[AccessResult, float]:
        """One batch of ``vm``'s workload with the disk I/O that comes with it; returns the
        access result and the seconds the whole took."""
        host, workload = self.host, self.workloads[vm.name]
        io = workload.take_io() if hasattr(workload, "take_io") else None
        io_seconds = 0.0
        if io is not None and len(io[0][0]):  # reads into the page cache come first
            io_seconds += host.disk_io(vm, workload_disk(host, vm, workload), io[0][0], io[0][1],
                                       np.zeros(len(io[0][0]), bool))
        # A batch with disk I/O runs whole: its write-backs belong to all of its writes.
        result = host.access(vm, step[0], step[1], within_budget=io is None)
        if io is not None and len(io[1][0]):  # write-backs of the pages the batch wrote
            io_seconds += host.disk_io(vm, workload_disk(host, vm, workload), io[1][0], io[1][1],
                                       np.ones(len(io[1][0]), bool))
        return result, result.seconds + io_seconds

    def _report_progress(self, within_step: float) -> None:
        self.progress(min(1.0, (self._done + within_step) / self._planned), f"t={self.host.now:.3f}s")

    # -- the timeline -------------------------------------------------------------------------

    def run(self) -> Report:
        """Perform every timeline step (or one ``run`` of 1 s when there is no timeline), stop
        the host and return the report."""
        started = time.perf_counter()
        actions = self.host.registries["action"]
        timeline = self.scenario.timeline or ({"do": "run", "for": "1s"},)
        try:
            steps = [Step(self, i, dict(s)) for i, s in enumerate(timeline)]
            for step in steps:
                if step.action not in actions:
                    raise step.error("do", f"unknown action {step.action[:60]!r} (known: {', '.join(actions)})")
            log.info("run started", scenario=self.scenario.name, backend=self.host.backend.name,
                     vms=len(self.host.vms), steps=len(steps), plugins=",".join(sorted(self.scenario.plugins)))
            for step in steps:
                log.info("step", index=step.index, action=step.action, time=round(self.host.now, 6),
                         **{k: v[:80] if isinstance(v, str) else v for k, v in step.data.items()
                            if k in _LOGGED and isinstance(v, (str, int, float))})
                self.host.metrics.event(self.host.now, "step", action=step.action, index=step.index)
                self._perform(actions, step)
                step.check_unknown()
        except GuestDied as exc:
            # A guest killed from outside: the run ends here, with the report of what ran.
            self.host.metrics.event(self.host.now, "guest_died", error=str(exc))
            exc.report = self._finish(started)
            raise
        finally:
            self._workdir.cleanup()
        return self._finish(started)

    def _perform(self, actions, step: Step) -> None:
        """Perform one step. An action that takes a ``plugin`` argument gets the host's
        instance of the plugin that registered it (None when the scenario does not enable
        that plugin): state lives in the plugin, once per host."""
        function = actions[step.action]
        if "plugin" in _parameters(function):
            function(self, step, plugin=actions.owner_in(self.host.pm, step.action))
        else:
            function(self, step)

    def _finish(self, started: float) -> Report:
        self.host.stop()
        self.host.metrics.sample_memory(self.host)
        report = Report.build(self, real_seconds=time.perf_counter() - started)
        log.info("run finished", scenario=self.scenario.name, clock_seconds=round(self.host.now, 6),
                 real_seconds=round(time.perf_counter() - started, 3), sections=len(report.sections))
        return report


_LOGGED = ("vm", "for", "name", "node", "target_free", "pages")
"""Keys of a timeline step that its log line shows (which VM, how long, which checkpoint...)."""


def workload_disk(host: Host, vm: VM, workload):
    """The disk a workload that does disk I/O reads (its ``disk`` option, or the VM's first)."""
    return host.disk(vm, getattr(workload, "disk", None))


def _step_seconds(step: dict) -> float:
    """Planned duration of a step, for the progress bar only (0 when it cannot be told)."""
    from memvisor.scenario import parse_duration

    try:
        return parse_duration(step.get("for", 0)) if step.get("do") in ("run", "idle") else 0.0
    except ValueError:
        return 0.0




def _parameters(function) -> tuple[str, ...]:
    """Names of the parameters ``function`` takes (empty when they cannot be told)."""
    import inspect

    try:
        return tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return ()
