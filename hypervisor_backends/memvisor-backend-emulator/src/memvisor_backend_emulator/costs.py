"""The emulator's virtual-time cost model.

Every figure is a documented default that a scenario can override in ``[host.costs]``. They are
round numbers of the right order for a current x86 server, chosen so that results are
deterministic and comparable, not to predict one machine:

==================  ==========  ===========================================================
name                default     what it is
==================  ==========  ===========================================================
dram_local_ns       80          one guest access to a page on the VM's home NUMA node
dram_remote_ns      136         one access to a page on another node (1 : 1.7)
trap_ns             2000        one trap delivered to the hypervisor (exit, handler, resume)
zero_fill_ns        300         filling a 4 KiB page with zeros when a fault is served
page_copy_ns        500         copying one 4 KiB page in memory (8 GiB/s)
disk_latency_us     100         one disk read or write call (NVMe-class)
disk_gib_per_s      2.0         disk bandwidth
net_latency_us      50          one network message
net_gbit_per_s      10.0        network bandwidth
numa_gib_per_s      4.0         page migration bandwidth between NUMA nodes
compress_mib_per_s  500.0       zstd level 1 compression of page blocks
==================  ==========  ===========================================================
"""

from __future__ import annotations

import attrs

from memvisor.errors import UserError

GIB = 1 << 30
MIB = 1 << 20


@attrs.frozen
class CostModel:
    """Virtual-time costs; see the module docstring for the meaning of each field."""

    dram_local_ns: float = 80.0
    dram_remote_ns: float = 136.0
    trap_ns: float = 2000.0
    zero_fill_ns: float = 300.0
    page_copy_ns: float = 500.0
    disk_latency_us: float = 100.0
    disk_gib_per_s: float = 2.0
    net_latency_us: float = 50.0
    net_gbit_per_s: float = 10.0
    numa_gib_per_s: float = 4.0
    compress_mib_per_s: float = 500.0

    @classmethod
    def from_options(cls, options: dict, where: str = "host.costs") -> CostModel:
        """Build from a scenario table, rejecting unknown names and values outside [1e-9, 1e12]
        (NaN and infinities included: virtual time must stay finite)."""
        known = {f.name for f in attrs.fields(cls)}
        for key, value in options.items():
            if key not in known:
                raise UserError(f"{where}.{key}: unknown cost (known: {', '.join(sorted(known))})")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 1e-9 <= value <= 1e12:
                raise UserError(f"{where}.{key}: must be a number from 1e-9 to 1e12, got {value!r}")
        return cls(**{k: float(v) for k, v in options.items()})

    def work_seconds(self, kind: str, nbytes: int, ops: int = 1) -> float:
        """Seconds that hypervisor work of ``kind`` on ``nbytes`` in ``ops`` calls takes."""
        if kind in ("disk_read", "disk_write"):
            return ops * self.disk_latency_us * 1e-6 + nbytes / (self.disk_gib_per_s * GIB)
        if kind == "network":
            return ops * self.net_latency_us * 1e-6 + nbytes * 8 / (self.net_gbit_per_s * 1e9)
        if kind == "copy":
            return nbytes / 4096 * self.page_copy_ns * 1e-9
        if kind == "numa_copy":
            return nbytes / (self.numa_gib_per_s * GIB)
        if kind == "compress":
            return nbytes / (self.compress_mib_per_s * MIB)
        if kind == "zero_fill":
            return nbytes / 4096 * self.zero_fill_ns * 1e-9
        raise ValueError(f"unknown kind of work {kind!r}")
