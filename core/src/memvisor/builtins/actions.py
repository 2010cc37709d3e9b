"""The core's scenario timeline actions: run, idle, workload, pressure, move_vcpus, create_vm;
and the report section on reclaimed memory, plugin failures and stopped VMs."""

from __future__ import annotations

from memvisor import hookimpl


def run(run, step):
    """``do = "run"``: run the guests' workloads ``for`` a duration or for ``accesses``
    accesses per VM (``vms`` limits it to some VMs)."""
    seconds = step.span("for", None)
    accesses = step.integer("accesses", None, low=1, high=10**12)
    if seconds is None and accesses is None:
        raise step.error("for", "run needs for = DURATION or accesses = N")
    run.run_guests(seconds=seconds, accesses=accesses, vms=step.vms())


def idle(run, step):
    """``do = "idle"``: let time pass ``for`` a duration with no guest activity (ticks fire)."""
    seconds = step.span("for")
    run.host.advance(seconds)
    run._done += seconds


def workload(run, step):
    """``do = "workload"``: give VM ``vm`` a new ``workload`` table from now on."""
    vm = step.vm()
    spec = step.get("workload", dict)
    run.workloads[vm.name] = run.make_workload(spec, vm, step.key("workload"))


def pressure(run, step):
    """``do = "pressure"``: ask the reclaimers for memory until ``target_free`` (a size) is
    free, as if free memory had fallen below the watermark."""
    from memvisor import PAGE_SIZE

    target = step.size("target_free") // PAGE_SIZE
    if target > run.host.backend.total_pages():
        raise step.error("target_free", "is more than the host's memory")
    run.host.check_pressure(target_free_pages=target)


def move_vcpus(run, step):
    """``do = "move_vcpus"``: move VM ``vm``'s virtual CPUs to NUMA ``node``."""
    vm = step.vm()
    node = step.integer("node", low=0, high=run.host.backend.numa_nodes - 1)
    run.host.move_vcpus(vm, node)


def create_vm(run, step):
    """``do = "create_vm"``: create a VM now, with the keys of a ``[[vm]]`` table (``name``,
    ``memory``, ``node``, ``large_pages``, ``contents``, ``workload``, ``seed``, ``budgets``).

    A VM's pages are all backed when it is created, so a host overcommits by creating VMs
    after reclaim: when free memory is short of the VM's size plus the high watermark, the
    reclaimers are asked for it first (:func:`memvisor_memory_pressure`); if it still does not
    fit, the step fails with one line naming it."""
    from memvisor import PAGE_SIZE
    from memvisor.contents import ContentSpec
    from memvisor.errors import ScenarioError, UserError
    from memvisor.limits import MAX_VMS

    host = run.host
    name = step.name("name")
    if name in host.vms:
        raise step.error("name", f"a VM named {name!r} exists already")
    if len(host.vms) >= MAX_VMS:
        raise step.error("name", f"the host has {MAX_VMS:,} VMs, the most a scenario may create")
    pages = step.pages("memory")
    if pages > host.backend.total_pages():
        raise step.error("memory", f"VM {name!r} is larger than the host's memory")
    node = step.integer("node", 0, low=0, high=host.backend.numa_nodes - 1)
    contents_value = step.get("contents", (str, dict), None)
    try:
        contents = None if contents_value is None else ContentSpec.parse(contents_value, step.key("contents"))
    except UserError as exc:
        raise ScenarioError.within(step.path, exc) from None
    spec = step.get("workload", dict, {})
    large = step.get("large_pages", bool, False)
    seed = step.integer("seed", None, low=0, high=2**63 - 1)
    budget = None
    if "budgets" in step.data:
        from memvisor.budgets import Budget

        try:
            budget = Budget.parse(step.table("budgets").data, step.key("budgets"), host.config.budget)
        except UserError as exc:
            raise ScenarioError.within(step.path, exc) from None
    margin = int(host.config.high_watermark * host.backend.total_pages())
    if host.backend.free_pages() < pages + margin:
        host.check_pressure(target_free_pages=pages + margin)
    if host.backend.free_pages() < pages:
        raise step.error("memory", f"VM {name!r} needs {pages * PAGE_SIZE >> 20} MiB; only "
                                   f"{host.backend.free_pages() * PAGE_SIZE >> 20} MiB are free after reclaim")
    vm = host.create_vm(name, pages, home_node=node, large_pages=large, contents=contents, seed=seed,
                        budget=budget)
    host.metrics.event(host.now, "vm_created", vm=name, pages=pages)
    if spec:
        if "kind" not in spec:
            raise step.error("workload", "needs a kind, e.g. { kind = \"zipf\" }")
        run.workloads[vm.name] = run.make_workload(spec, vm, step.key("workload"))


class CoreActions:
    """Registers the core's timeline actions and reports reclaim, failures and stops."""

    @hookimpl
    def memvisor_register_actions(self, register):
        """run, idle, workload, pressure, move_vcpus and create_vm."""
        for function in (run, idle, workload, pressure, move_vcpus, create_vm):
            register(function.__name__, function)

    @hookimpl
    def memvisor_report(self, host):
        """One section: machine memory the VMs use against their size, the pages each plugin
        reclaimed under memory pressure, the faulting pages each plugin served (zero-fill for
        the core's default), the plugins that failed in a hook and the VMs stopped."""
        from memvisor import PAGE_SIZE
        from memvisor.report import MEMORY_SECTION, Column, Figure, Headline, ReportSection, Table

        backend = host.backend
        vm_pages = sum(vm.pages for vm in host.vms.values())
        used = backend.total_pages() - backend.free_pages()
        mib = PAGE_SIZE / 2**20
        metrics = {
            "host_mib": backend.total_pages() * mib,
            "vm_mib": vm_pages * mib,
            "overcommit": round(vm_pages / backend.total_pages(), 3),
            "used_mib": used * mib,
            "saved_mib": max(0, vm_pages - used) * mib,
            "reclaimed_under_pressure_mib": {k: v * mib for k, v in sorted(host.reclaimed_by.items())},
            "faults_served_by": dict(sorted(host.faults_served_by.items())),
            "plugin_failures": len(host.plugin_failures),
            "plugin_failures_by_plugin": _count(f"{f['plugin']}:{f['hook']}" for f in host.plugin_failures),
            "vms_stopped": {vm.name: vm.stopped for vm in host.vms.values() if vm.stopped},
        }
        memory = {"vms": Figure(("vm_mib",), "MiB", label="VM memory"),
                  "used": Figure(("used_mib",), "MiB", "lower", "memory in use"),
                  "host": Figure(("host_mib",), "MiB", label="host memory")}
        text = "the VMs' {vms} of memory took {used} of the host's {host} at the end"
        if metrics["saved_mib"]:
            memory["saved"] = Figure(("saved_mib",), "MiB", "higher", "saved by the techniques")
            text += ": the techniques save {saved}"
        headlines = [Headline(text, memory)]
        if host.plugin_failures:
            headlines.append(Headline("{failures} plugin failures inside hooks, isolated (docs/reliability.md)",
                                      {"failures": Figure(("plugin_failures",), "count", "lower")}, key="failures"))
        for name in metrics["vms_stopped"]:
            headlines.append(Headline("stopped: {why}", {"why": Figure(("vms_stopped", name), "text", label="stopped")},
                                      vm=name, key="stopped"))
        tables = [
            Table("", [Column("host_mib", "host memory", "MiB"), Column("vm_mib", "VM memory", "MiB"),
                       Column("overcommit", "overcommit", "ratio", help="VM memory / host memory"),
                       Column("used_mib", "in use at the end", "MiB"),
                       Column("saved_mib", "saved by the techniques", "MiB", help="VM memory - memory in use"),
                       Column("plugin_failures", "plugin failures", "count")], record=()),
            Table("Reclaimed under memory pressure, by plugin",
                  [Column(k, k, "MiB") for k in metrics["reclaimed_under_pressure_mib"]],
                  record=("reclaimed_under_pressure_mib",)),
            Table("Plugin failures, by plugin and hook",
                  [Column(k, k, "count") for k in metrics["plugin_failures_by_plugin"]],
                  record=("plugin_failures_by_plugin",)),
            Table("VMs stopped", [Column(k, k, "text") for k in metrics["vms_stopped"]], record=("vms_stopped",)),
        ]
        return ReportSection("memvisor", MEMORY_SECTION, metrics, headlines=headlines, tables=tables,
                             text="VM memory against machine memory (overcommit), machine pages the techniques "
                                  "save now, pages each plugin reclaimed under memory pressure, faulting pages "
                                  "each plugin served (zero-fill: the core's default), plugins that "
                                  "failed inside a hook (isolated: docs/reliability.md) and VMs stopped.")


def _count(items) -> dict:
    from collections import Counter

    return dict(Counter(items))


PLUGIN = CoreActions
