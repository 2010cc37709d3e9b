"""``memvisor bench scale``: the identity model beside the bytes model, and hosts far larger
than the machine that runs them.

Cases (docs/performance.md has the table and docs/backends/emulator.md what they mean):

``accesses-{1,16,256,1024}gib``
    Guest accesses per second on an identity-model host of that size: one VM of 90% of its
    memory (mixed contents), a zipf(0.99) workload over the whole VM, 30% writes, 8 batches of
    1 Mi accesses generated before timing (the emulator's work only, as ``bench emulator``).
    Baseline: the bytes model at 1 GiB for the 1 GiB case (the same VM and batches), the
    identity model at 1 GiB for the others (the goal: within 2x of it at 1 TiB).
``memory-per-gib``
    Memory per GiB of emulated guest memory with every technique on: the fleet host
    (examples/fleet-host.toml) scaled to 64 and 256 GiB and run to the end, each in a fresh
    process; the growth of peak RSS between the two divided by the growth of guest memory
    (what each more GiB costs, without the interpreter's fixed part). Baseline: the same figure
    for the bytes model, at 2 and 4 GiB (the fleet needs 2 GiB at least to start its VMs).
``arrays-per-gib``
    The numpy arrays the 256 GiB run holds at its end, per GiB of guest memory
    (:func:`memvisor.footprint.array_bytes`): an independent count behind ``memory-per-gib``.
``agree-{reclaimed,checkpoint,migration}-4gib``
    The fleet host scaled to 4 GiB, run to the end in both models (fresh processes): the pages
    the reclaimers freed under memory pressure, the bytes the 64 GiB VM's (here 256 MiB)
    checkpoint wrote and the bytes the live migration sent. Value: the identity model's figure;
    baseline: the bytes model's (ratio 1 means the same answer).

The scale cases need every technique plugin of this repository installed (the fleet host
enables them); ``python -m memvisor_backend_emulator.scale GIB MODEL`` is the child that runs
one scaled fleet and prints its figures as JSON.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time

import numpy as np

from memvisor import PAGE_SIZE
from memvisor.bench import Baseline, BenchCase

SIZES_GIB = (1, 16, 256, 1024)
BATCH = 1 << 20
BATCHES = 8
GIB_PAGES = (1 << 30) // PAGE_SIZE


# -- accesses per second at each host size --------------------------------------------------------


@functools.cache
def _host_with_vm(gib: int, model: str):
    """An emulated host of ``gib`` GiB of ``model`` with one VM of 90% of it, and the batches."""
    from memvisor.contents import ContentSpec
    from memvisor.host import Host, HostConfig
    from memvisor.workloads import make_workload

    pages = gib * GIB_PAGES
    host = Host(HostConfig(memory_pages=pages, contents=model, seed=1))
    vm_pages = int(pages * 0.9) // 512 * 512
    vm = host.create_vm("bench", vm_pages, contents=ContentSpec.parse("mixed", "bench"))
    workload = make_workload({"kind": "zipf", "alpha": 0.99, "write_fraction": 0.3}, vm_pages, 1)
    return host, vm, [workload.next_batch(BATCH) for _ in range(BATCHES)]


def _accesses_per_s(gib: int, model: str) -> float:
    host, vm, batches = _host_with_vm(gib, model)
    start = time.perf_counter()
    for gpps, writes in batches:
        host.access(vm, gpps, writes)
    return BATCHES * BATCH / (time.perf_counter() - start)


def _access_case(gib: int) -> BenchCase:
    if gib == 1:
        baseline = Baseline("bytes-1gib", lambda _: _accesses_per_s(1, "bytes"))
    else:
        baseline = Baseline("identity-1gib", lambda _: _accesses_per_s(1, "identity"))
    return BenchCase(f"accesses-{gib}gib", "accesses_per_s", "accesses/s", lambda _: _accesses_per_s(gib, "identity"),
                     setup=lambda: _host_with_vm(gib, "identity"), baseline=baseline, runs=3,
                     goal="within 2x of identity-1gib at 1 TiB" if gib > 1 else "as fast as the bytes model")


# -- the fleet in a fresh process ---------------------------------------------------------------------


@functools.cache
def fleet_figures(gib: float, model: str) -> dict:
    """Run the fleet host scaled to ``gib`` GiB in ``model`` in a fresh process; its figures."""
    out = subprocess.run([sys.executable, "-m", "memvisor_backend_emulator.scale", str(gib), model],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"fleet at {gib} GiB ({model}) failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_fleet(gib: float, model: str) -> dict:
    """The child: run the scaled fleet to its end; peak RSS, guest memory, arrays, and the
    figures the two models are compared on."""
    from memvisor.footprint import array_bytes
    from memvisor.runner import ScenarioRun
    from memvisor.scenario import parse_scenario
    from memvisor_backend_emulator.fleet import fleet_scenario, guest_gib

    scenario = fleet_scenario(gib, model)
    run = ScenarioRun(parse_scenario(scenario, f"fleet-{gib:g}gib"))
    started = time.perf_counter()
    report = run.run().data
    seconds = time.perf_counter() - started
    arrays = sum(array_bytes(run.host, run.workloads).values())
    sections = {(s["plugin"], s["title"]): s["metrics"] for s in report["sections"]}
    core = sections[("memvisor", "Memory, reclaim and reliability")]
    jobs = sections[("memvisor", "Checkpoints")]["jobs"]
    migrations = sections[("memvisor", "Live migrations and memory errors")]["migrations"]
    pressure = [e for e in report["core"]["events"] if e["kind"] == "memory_pressure"]
    return {
        "gib": gib, "model": model, "guest_gib": guest_gib(scenario), "seconds": seconds,
        "peak_rss_bytes": _peak_rss(), "array_bytes": arrays,
        "reclaimed_pages": sum(e["reclaimed_pages"] for e in pressure),
        "reclaimed_mib_by_technique": core["reclaimed_under_pressure_mib"],
        "checkpoint_bytes": next(j["bytes_out"] for j in jobs if j["method"] == "stop-the-world"),
        "migration_bytes": migrations[0]["bytes_sent"],
        "guest_visible_errors": sections[("balloon", "Ballooning")]["guest_visible_errors"],
        "migrations_verified": all(m.get("verified") for m in migrations),
    }


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _per_gib(small: float, large: float, model: str) -> float:
    """MiB of peak RSS per more GiB of guest memory between two sizes of the fleet."""
    a, b = fleet_figures(small, model), fleet_figures(large, model)
    return (b["peak_rss_bytes"] - a["peak_rss_bytes"]) / 2**20 / (b["guest_gib"] - a["guest_gib"])


def _agree(key: str) -> list[BenchCase]:
    name = {"reclaimed_pages": "reclaimed", "checkpoint_bytes": "checkpoint", "migration_bytes": "migration"}[key]
    goal = "ratio 1 (equal)" if key == "reclaimed_pages" else "ratio within 0.95-1.05"
    return [BenchCase(f"agree-{name}-4gib", key, "pages" if key == "reclaimed_pages" else "bytes",
                      lambda _: fleet_figures(4, "identity")[key],
                      baseline=Baseline("bytes-4gib", lambda _: fleet_figures(4, "bytes")[key]),
                      runs=1, warmup=0, goal=goal)]


def cases() -> list[BenchCase]:
    """The scale benchmark's cases."""
    out = [_access_case(gib) for gib in SIZES_GIB]
    out.append(BenchCase("memory-per-gib", "rss_per_guest_gib", "MiB/GiB", lambda _: _per_gib(64, 256, "identity"),
                         baseline=Baseline("bytes-2-4gib", lambda _: _per_gib(2, 4, "bytes")),
                         higher_is_better=False, runs=1, warmup=0, goal="<= 12 MiB per GiB"))
    out.append(BenchCase("arrays-per-gib", "array_bytes_per_guest_gib", "MiB/GiB",
                         lambda _: fleet_figures(256, "identity")["array_bytes"] / 2**20
                         / fleet_figures(256, "identity")["guest_gib"],
                         higher_is_better=False, runs=1, warmup=0, goal="<= 12 MiB per GiB"))
    for key in ("reclaimed_pages", "checkpoint_bytes", "migration_bytes"):
        out.extend(_agree(key))
    return out


if __name__ == "__main__":  # the child of fleet_figures
    print(json.dumps(run_fleet(float(sys.argv[1]), sys.argv[2]), default=lambda v: v.item()
                     if isinstance(v, np.generic) else str(v)))
