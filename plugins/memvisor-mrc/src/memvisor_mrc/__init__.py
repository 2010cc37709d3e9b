"""memvisor-mrc: miss-rate curves of running workloads from a sampled, partly untraced page trace.

The plugin (:class:`memvisor_mrc.plugin.MRCPlugin`, entry point ``mrc``) traces a spatial sample
of each VM's pages and keeps its curve up to date (:mod:`memvisor_mrc.online`); ``memvisor mrc``
(:mod:`memvisor_mrc.cli`) computes curves of trace files; ``memvisor bench mrc``
(:mod:`memvisor_mrc.bench`) measures accuracy and cost.

Algorithm library: exact LRU stack distances (:mod:`memvisor_mrc.stack_distance`), SHARDS-style
spatially sampled curves and an online LRU over sampled pages (:mod:`memvisor_mrc.shards`), a model
of the untraced period after each trapped access (:mod:`memvisor_mrc.untrace`), the curve type
(:mod:`memvisor_mrc.curve`) and what a curve tells (:mod:`memvisor_mrc.summary`).
"""

__version__ = "0.1.0"
