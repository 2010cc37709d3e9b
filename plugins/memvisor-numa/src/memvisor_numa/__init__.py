"""memvisor-numa: after a VM's virtual CPUs move to another NUMA node, migrate its most used
pages first, so that its accesses become local again as soon as possible.

The plugin (:class:`NumaPlugin`, entry point ``numa``) chooses pages by one of several
heuristics (:mod:`memvisor_numa.heuristics`), migrates at most the interconnect's bandwidth per
tick, stops once the VM's accesses are local, and reports the time to 90% and 99% local
accesses, the bytes migrated and the migrations wasted on pages the guest never touched again.
``memvisor numa compare`` runs every heuristic on one workload; ``memvisor bench numa``
measures the best one against address order. docs/numa.md has the details.
"""

from memvisor_numa.plugin import NumaPlugin
from memvisor_numa.settings import HEURISTICS, HOT_FIRST

__version__ = "0.1.0"

__all__ = ["HEURISTICS", "HOT_FIRST", "NumaPlugin", "__version__"]
