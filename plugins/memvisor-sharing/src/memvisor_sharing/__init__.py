"""memvisor-sharing: page sharing at 4 KiB granularity inside 2 MiB large pages.

A scanner hashes every small page (the subpages of large pages too) at a rate per tick, keeps a
table of candidate contents and shares verified duplicates copy-on-write; it estimates, per large
page and in total, the machine memory sharing could reclaim; under memory pressure it breaks up
large pages most reclaimable first and shares their subpages. ``memvisor sharing estimate``
computes the same estimate over raw memory images or a live process's memory.
"""

from memvisor_sharing.plugin import SharingPlugin

__all__ = ["SharingPlugin"]
