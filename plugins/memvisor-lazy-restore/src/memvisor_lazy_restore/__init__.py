"""memvisor-lazy-restore: resume a VM from a checkpoint at once and load its pages on demand.

The VM resumes with every page not present. A page fault reads the storage block that holds the
page (one read call), decompresses the page block that holds it and makes all its pages present
(with the rest of the faulting page's window); a background prefetcher loads the other storage
blocks, hottest first when the checkpoint has an access-order sidecar, else in file order.
docs/checkpoint.md describes it all.
"""

from memvisor_lazy_restore.plugin import LazyRestoreError, LazyRestorePlugin

__all__ = ["LazyRestoreError", "LazyRestorePlugin"]
