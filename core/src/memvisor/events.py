"""Event values passed to hooks.

Events are frozen attrs classes. Bulk data is numpy arrays (``eq=False`` on classes that hold
arrays), one array per batch: a hook call carries every page of a batch, never one page. New
information is added as a new field, never as a new hook argument.

Page numbers are ``int64`` arrays: guest physical pages (GPP) index a VM's memory, machine pages
(MPN) index the host's memory. ``-1`` means "no machine page".
"""

from __future__ import annotations

import attrs
import numpy as np


def _pages(value) -> np.ndarray:
    return np.asarray(value, dtype=np.int64)


def _mask(value) -> np.ndarray:
    return np.asarray(value, dtype=bool)


@attrs.frozen(eq=False)
class FaultBatch:
    """Pages of one VM that the guest touched while they were not present.

    :ivar gpps: the faulting guest pages, each once, in the order of their first touch.
    :ivar writes: per page, whether the first faulting access was a write.
    :ivar time: virtual (or real) time in seconds when the batch trapped.
    """

    gpps: np.ndarray = attrs.field(converter=_pages)
    writes: np.ndarray = attrs.field(converter=_mask)
    time: float = 0.0


@attrs.frozen(eq=False)
class AccessBatch:
    """Traced pages of one VM that the guest touched; the core untraced them before the call.

    :ivar gpps: the touched traced pages, each once, in the order of their first touch.
    :ivar writes: per page, whether the first traced access was a write.
    :ivar positions: per page, the index of that access within the guest's batch of accesses,
        so that a plugin can order traps from several batches (MRC stack distances).
    :ivar time: time in seconds when the batch trapped.
    """

    gpps: np.ndarray = attrs.field(converter=_pages)
    writes: np.ndarray = attrs.field(converter=_mask)
    positions: np.ndarray = attrs.field(converter=_pages)
    time: float = 0.0


@attrs.frozen(eq=False)
class WriteBatch:
    """Pages of one VM that the guest is about to write while they are shared or write-protected.

    The write has not landed yet. After every implementation has seen the batch, the core makes
    the pages writable: it gives each page that is still shared a private copy (copy-on-write) and
    clears write protection. A plugin that wants to act first (save the page, reset a balloon)
    does so in its hook implementation.

    :ivar gpps: the pages, each once, in the order of their first write.
    :ivar mpns: the machine page behind each GPP at the time of the trap.
    :ivar shared: per page, whether the machine page is shared (reference count above one or the
        zero page) rather than only write-protected.
    :ivar time: time in seconds when the batch trapped.
    """

    gpps: np.ndarray = attrs.field(converter=_pages)
    mpns: np.ndarray = attrs.field(converter=_pages)
    shared: np.ndarray = attrs.field(converter=_mask)
    time: float = 0.0


@attrs.frozen
class Tick:
    """Time advanced by one tick interval.

    :ivar now: the time in seconds after the advance.
    :ivar interval: the tick interval in seconds.
    :ivar number: how many ticks came before this one.
    """

    now: float
    interval: float
    number: int


@attrs.frozen
class MemoryPressure:
    """Free machine memory fell below the host's low watermark (or a scenario raised pressure).

    :ivar free_pages: free machine pages when the event fired.
    :ivar target_free_pages: free pages the host wants to have after reclaim.
    :ivar time: time in seconds.
    """

    free_pages: int
    target_free_pages: int
    time: float = 0.0

    @property
    def deficit_pages(self) -> int:
        """Pages to reclaim to reach the target (0 when there is none)."""
        return max(0, self.target_free_pages - self.free_pages)


@attrs.frozen
class VcpuMove:
    """A VM's virtual CPUs moved to another NUMA node; its memory stayed where it was.

    :ivar old_node: the node the VM ran on before.
    :ivar new_node: the VM's new home node.
    :ivar time: time in seconds.
    """

    old_node: int
    new_node: int
    time: float = 0.0


@attrs.frozen
class SaveRequest:
    """A checkpoint of one VM's memory is asked for.

    :ivar path: the checkpoint file to write (atomically: it appears complete or not at all).
    :ivar lazy: True asks for a lazy save (the VM keeps running), False for stop-the-world,
        None leaves it to the plugins (a lazy-save plugin that is enabled takes it).
    :ivar block_pages: pages per page block (unit of compression and of lazy restore).
    :ivar buffer_bytes: staging buffer: one storage block is written per full buffer.
    :ivar level: zstd level.
    :ivar key: key material for a keyed MAC, or None.
    :ivar time: time in seconds when the save was asked for.
    """

    path: str
    lazy: bool | None = None
    block_pages: int = 64
    buffer_bytes: int = 4 << 20
    level: int = 1
    key: bytes | None = None
    time: float = 0.0


@attrs.frozen
class RestoreRequest:
    """A VM's memory is to be replaced by a checkpoint's.

    :ivar path: the checkpoint file.
    :ivar lazy: True asks for a lazy restore (the VM resumes at once, pages load on fault),
        False for an eager one, None leaves it to the plugins.
    :ivar key: key material: a file without a valid MAC made with it is refused.
    :ivar time: time in seconds when the restore was asked for.
    """

    path: str
    lazy: bool | None = None
    key: bytes | None = None
    time: float = 0.0


@attrs.frozen(eq=False)
class RestoreStart:
    """A restore of one VM passed its checks and is about to replace every page of its memory.

    :ivar request: the :class:`RestoreRequest`.
    :ivar record_pages: the pages the checkpoint stores as plugin records, by record kind
        (``{"disk-ref": gpps}``): their records were resolved by the check, and each of these
        pages will hold exactly the bytes its record resolved to.
    """

    request: RestoreRequest
    record_pages: dict = attrs.field(factory=dict)


@attrs.frozen(eq=False)
class PageRecords:
    """Pages that a plugin describes more cheaply than by their bytes (a checkpoint or a
    migration stream stores the record instead of the data).

    :ivar kind: the record kind, a name such as ``"disk-ref"``; the plugin that writes a kind
        also resolves it (:func:`memvisor_resolve_records`).
    :ivar gpps: the pages described.
    :ivar payloads: one payload per page: a ``(len(gpps), width)`` uint8 array, or a list of
        bytes (a plugin resolving records gets the array form whenever every payload of the kind
        has the same length).
    """

    kind: str
    gpps: np.ndarray = attrs.field(converter=_pages)
    payloads: object = None


@attrs.frozen(eq=False)
class DiskIOBatch:
    """Guest disk I/O of one VM on one disk: blocks read into guest pages (the page cache) or
    written back from them. It has happened when the hook is called: after a read the pages hold
    the blocks' bytes, after a write the blocks hold the pages' bytes.

    :ivar disk: the :class:`memvisor.disks.Disk`.
    :ivar gpps: the guest pages, one per transfer.
    :ivar blocks: the disk block (4 KiB) of each transfer.
    :ivar writes: per transfer, True for a write to the disk, False for a read from it.
    :ivar time: time in seconds when the I/O completed.
    """

    disk: object
    gpps: np.ndarray = attrs.field(converter=_pages)
    blocks: np.ndarray = attrs.field(converter=_pages)
    writes: np.ndarray = attrs.field(converter=_mask)
    time: float = 0.0


@attrs.frozen(eq=False)
class MemoryErrorEvent:
    """An uncorrectable memory error: the bytes of some machine pages are wrong (bit flips).

    :ivar gpps: the guest pages of the VM whose machine pages were hit.
    :ivar mpns: the machine page behind each guest page.
    :ivar time: time in seconds.
    """

    gpps: np.ndarray = attrs.field(converter=_pages)
    mpns: np.ndarray = attrs.field(converter=_pages)
    time: float = 0.0


@attrs.frozen
class MigrationPhase:
    """A live migration of a VM reached a phase.

    :ivar phase: ``"start"``, ``"round"`` (a pre-copy round begins), ``"stop_and_copy"``,
        ``"postcopy"`` (the destination runs and pulls missing pages), ``"end"``, or
        ``"aborted"`` (the migration failed after its start; the VM runs on on the source).
    :ivar round: number of the pre-copy round (0 before the first).
    :ivar pages: pages to send in this phase (0 where not known).
    :ivar destination: the destination :class:`memvisor.host.Host`.
    :ivar time: time in seconds on the source.
    """

    phase: str
    round: int = 0
    pages: int = 0
    destination: object = None
    time: float = 0.0
