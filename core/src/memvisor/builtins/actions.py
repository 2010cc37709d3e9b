"""The core's scenario timeline actions: run, idle, workload, pressure, move_vcpus."""

from __future__ import annotations

from memvisor import hookimpl


def run(run, step):
    """``do = "run"``: run the guests' workloads ``for`` a duration or for ``accesses``
    accesses per VM (``vms`` limits it to some VMs)."""
    seconds = step.duration("for", None)
    accesses = step.get("accesses", int, None)
    if seconds is None and accesses is None:
        raise step.error("for", "run needs for = DURATION or accesses = N")
    run.run_guests(seconds=seconds, accesses=accesses, vms=step.vms())


def idle(run, step):
    """``do = "idle"``: let time pass ``for`` a duration with no guest activity (ticks fire)."""
    seconds = step.duration("for")
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
    run.host.check_pressure(target_free_pages=target)


def move_vcpus(run, step):
    """``do = "move_vcpus"``: move VM ``vm``'s virtual CPUs to NUMA ``node``."""
    vm = step.vm()
    node = step.get("node", int)
    if not 0 <= node < run.host.backend.numa_nodes:
        raise step.error("node", f"the host has NUMA nodes 0..{run.host.backend.numa_nodes - 1}")
    run.host.move_vcpus(vm, node)


class CoreActions:
    """Registers the core's timeline actions."""

    @hookimpl
    def memvisor_register_actions(self, register):
        """run, idle, workload, pressure and move_vcpus."""
        for function in (run, idle, workload, pressure, move_vcpus):
            register(function.__name__, function)


PLUGIN = CoreActions
