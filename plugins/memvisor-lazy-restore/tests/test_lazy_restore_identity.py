"""A lazy restore of an identity-model VM's checkpoint: the guest reads exactly what it read at
the save, page by page against the reference model, while the pages come in on fault."""

import numpy as np

from memvisor.builtins.checkpoint import CheckpointReader
from memvisor.contents import ContentSpec
from memvisor.events import RestoreRequest, SaveRequest
from memvisor.testing import ReferenceMemory, small_host

SPEC = ContentSpec.parse({"zero": 0.35, "text": 0.3, "random": 0.2, "duplicate": 0.15}, "contents")
PAGES = 8192


def test_identity_checkpoint_restores_lazily_every_page(tmp_path):
    """Save on an identity host, scribble over 500 pages, restore lazily, run the guest over
    every page: it reads what it read at the save, and the file held identities."""
    host = small_host(memory_pages=4 * PAGES, contents="identity", plugins=["lazy-restore"], seed=3)
    vm = host.create_vm("a", PAGES, contents=SPEC, seed=3)
    ref = ReferenceMemory()
    ref.follow(host, vm)
    ref.guest_write(host, vm, np.arange(100, 110), np.full((10, 4096), 9, np.uint8))
    path = tmp_path / "a.ckpt"
    host.save_checkpoint(vm, SaveRequest(str(path), time=host.now))
    saved = ref.expected["a"].copy()
    with CheckpointReader(path) as reader:
        assert reader.contents_model == "identity"
    ref.guest_write(host, vm, np.arange(0, 500), np.full((500, 4096), 7, np.uint8))
    host.restore_checkpoint(vm, RestoreRequest(str(path), lazy=True, time=host.now))
    ref.expected["a"] = saved
    ref.access(host, vm, np.arange(PAGES), np.zeros(PAGES, bool))
    ref.check(host)
    host.backend.check_invariants()
