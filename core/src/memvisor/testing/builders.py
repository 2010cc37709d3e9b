"""Small builders of event batches, for calling hook implementations directly in tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from memvisor.events import AccessBatch, FaultBatch, WriteBatch


def fault_batch(gpps: Sequence[int], writes: Sequence[bool] | None = None, time: float = 0.0) -> FaultBatch:
    """A :class:`FaultBatch` of ``gpps`` (reads unless ``writes`` says otherwise)."""
    gpps = np.asarray(gpps, dtype=np.int64)
    return FaultBatch(gpps, np.zeros(len(gpps), bool) if writes is None else writes, time)


def access_batch(gpps: Sequence[int], writes: Sequence[bool] | None = None, time: float = 0.0) -> AccessBatch:
    """An :class:`AccessBatch` of ``gpps`` touched in this order."""
    gpps = np.asarray(gpps, dtype=np.int64)
    return AccessBatch(gpps, np.zeros(len(gpps), bool) if writes is None else writes, np.arange(len(gpps)), time)


def write_batch(gpps: Sequence[int], mpns: Sequence[int] | None = None, shared: Sequence[bool] | None = None,
                time: float = 0.0) -> WriteBatch:
    """A :class:`WriteBatch` of ``gpps`` (machine pages -1 and not shared unless given)."""
    gpps = np.asarray(gpps, dtype=np.int64)
    return WriteBatch(gpps, np.full(len(gpps), -1) if mpns is None else mpns,
                      np.zeros(len(gpps), bool) if shared is None else shared, time)
