"""memvisor-lazy-save: checkpoint a VM's memory while the VM keeps running.

Every page is write-protected at the start (the only time the VM stops); page blocks are then
compressed into the checkpoint writer's staging buffer in the background, within the disk
bandwidth of the cost model, and each full buffer is written as one storage block. A guest
write to a page whose block is not saved yet saves that block first (copy before write), so the
checkpoint holds the memory as of the save's start. docs/checkpoint.md describes it all.
"""

from memvisor_lazy_save.plugin import LazySavePlugin

__all__ = ["LazySavePlugin"]
