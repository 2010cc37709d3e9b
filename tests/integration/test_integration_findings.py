"""Regression tests of what ``memvisor selftest`` found in long runs, each reduced by hand to
the few steps that matter (docs/reliability.md lists them)."""

import numpy as np
import pytest

from memvisor import PAGE_SIZE
from memvisor.builtins.checkpoint import CheckpointError
from memvisor.events import RestoreRequest, SaveRequest
from memvisor.testing import small_host
from memvisor.testing.integration import IntegrationModel

PLUGINS = ("stats", "mrc", "balloon", "sharing", "numa", "lazy-save", "lazy-restore", "diskmap")
"""The technique plugins of this repository, which these findings involve."""


def disk_backed_vm(seed=0):
    """Every technique on; one VM whose last 128 pages are page cache of its disk."""
    host = small_host(memory_pages=8192, numa_nodes=2, plugins=PLUGINS, seed=seed,
                      settings={"balloon": {"reload_delay": "20ms", "max_fraction": 0.5}})
    vm = host.create_vm("v0", 1024)
    rng = np.random.default_rng(seed)
    host.backend.write(vm, np.arange(vm.pages), rng.integers(0, 256, (vm.pages, PAGE_SIZE), np.uint8))
    disk = host.attach_disk(vm, blocks=256)
    model = IntegrationModel()
    model.follow(host, vm)
    cache = np.arange(vm.pages - 128, vm.pages)
    host.disk_io(vm, disk, cache, np.arange(128), np.zeros(128, bool))
    model.expected[vm.name][cache] = disk.read(np.arange(128))
    return host, vm, disk, model


def test_refused_restore_leaves_a_lazy_restore_under_way_serving_its_pages(tmp_path):
    """A second restore refused (the disk blocks its references name were written) must not end
    the lazy restore under way: its pages not yet loaded read zeros otherwise."""
    host, vm, disk, model = disk_backed_vm()
    path = str(tmp_path / "v0.ckpt")
    job = host.save_checkpoint(vm, SaveRequest(path, lazy=True, time=host.now))
    saved = model.expected[vm.name].copy()
    while not job.done:
        host.advance(host.tick_interval)
    host.restore_checkpoint(vm, RestoreRequest(path, lazy=True, time=host.now))
    model.expected[vm.name] = saved.copy()
    owed = int((~host.backend.present(vm, np.arange(vm.pages))).sum())
    assert owed > 500  # the restore is far from done
    # The guest writes pages of its page cache to the blocks they came from + 1: the
    # checkpoint's disk references to those blocks no longer resolve.
    pages = np.array([1000, 1001])
    host.disk_io(vm, disk, pages, np.array([5, 6]), np.ones(2, bool))
    with pytest.raises(CheckpointError, match="cannot be restored"):
        host.restore_checkpoint(vm, RestoreRequest(path, lazy=True, time=host.now))
    assert not len(model.unexpected_pages(host, vm, fault=True))


def test_memory_error_on_a_page_the_balloon_remapped_is_not_repaired_from_its_old_block():
    """diskmap mapped a page to a block; the balloon took the page and a write reset the
    balloon, so the page reads zeros. A memory error on it must not bring the block back."""
    host, vm, disk, model = disk_backed_vm(seed=3)
    balloon = host.pm.get_plugin("balloon")
    diskmap = host.pm.get_plugin("diskmap")
    page = 1000
    assert page in diskmap.mapped(vm)
    while page not in balloon.balloon_pages(vm):
        balloon.inflate(vm, 64)
    taken = balloon.balloon_pages(vm)
    model.expected[vm.name][taken] = 0  # the guest gave them up
    other = int(taken[taken != page][0])
    model.guest_write(host, vm, np.array([other]), np.full((1, PAGE_SIZE), 9, np.uint8))  # resets the balloon
    assert page not in balloon.balloon_pages(vm) and not host.backend.read(vm, np.array([page])).any()
    assert page in diskmap.mapped(vm)  # the mapping is stale, as documented
    data = host.backend.read(vm, np.array([page]))
    data[0, 77] ^= 1
    host.backend.write(vm, np.array([page]), data)
    outcome = host.memory_error(vm, np.array([page]))
    assert outcome["repaired"] == []
    model.known[vm.name][outcome["lost"]] = False
    assert not len(model.unexpected_pages(host, vm, fault=True))


def test_pressure_never_swaps_out_a_balloon_page_that_equals_a_zero_block():
    """A zero page written to a disk block is mapped to it; once the balloon takes the page it
    reads zeros still, so it equals its block — but it is the balloon's shared page, and
    dropping it would pull it from under the balloon."""
    host, vm, disk, model = disk_backed_vm(seed=5)
    balloon = host.pm.get_plugin("balloon")
    page = 10
    model.guest_write(host, vm, np.array([page]), np.zeros((1, PAGE_SIZE), np.uint8))
    host.disk_io(vm, disk, np.array([page]), np.array([200]), np.ones(1, bool))
    assert page in host.pm.get_plugin("diskmap").mapped(vm)
    while page not in balloon.balloon_pages(vm):
        balloon.inflate(vm, 64)
    state = balloon.state(vm)
    host.check_pressure(host.backend.total_pages())  # reclaim everything it can
    assert np.all(host.backend.mpns(vm, state.order) == state.mpn)
    assert balloon.verify() == 0
    model.expected[vm.name][balloon.balloon_pages(vm)] = 0
    assert not len(model.unexpected_pages(host, vm, fault=True))


def test_refused_restore_keeps_the_pages_diskmap_dropped(tmp_path):
    """Pages dropped under pressure (they equal their disk blocks) must still read right after
    a restore that was refused: diskmap forgot them as it saw the restore begin."""
    host, vm, disk, model = disk_backed_vm(seed=6)
    path = str(tmp_path / "v0.ckpt")
    host.save_checkpoint(vm, SaveRequest(path, lazy=False, time=host.now))
    host.check_pressure(host.backend.total_pages())
    model.expected[vm.name][host.pm.get_plugin("balloon").balloon_pages(vm)] = 0  # given up by the guest
    dropped = int((~host.backend.present(vm, np.arange(vm.pages))).sum())
    assert dropped > 100
    host.disk_io(vm, disk, np.array([3]), np.array([7]), np.ones(1, bool))  # a referenced block changes
    with pytest.raises(CheckpointError, match="cannot be restored"):
        host.restore_checkpoint(vm, RestoreRequest(path, lazy=False, time=host.now))
    assert not len(model.unexpected_pages(host, vm, fault=True))
