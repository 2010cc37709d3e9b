"""memvisor-qemu: memvisor's side of QEMU's migration stream.

QEMU stays the hypervisor; memvisor becomes the destination of a save and the source of a
restore or a migration, so that the checkpoint format and the plugins (diskmap's disk
references, lazy-restore's fault service and hottest-first prefetch) work on real QEMU VMs.
See docs/qemu.md.
"""

from memvisor_qemu.plugin import QemuPlugin

__all__ = ["QemuPlugin"]
