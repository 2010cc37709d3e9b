"""Moved: the sweep left the core for a distribution of its own (the core names none of its
plugins). The old import path fails in one line naming the new one; it goes in the next
release."""

raise ImportError("memvisor.sweep moved out of the core: it is the memvisor-sweep distribution now; "
                  "import memvisor_sweep (pip install \"memvisor-sweep[dask]\", or requirements-all.txt)")
