"""Round trips against the reference model: hypothesis over sizes, contents, file layouts,
windows and prefetch modes; and every combination of {stop-the-world, lazy} save x {eager,
lazy} restore (the lazy save through the installed memvisor-lazy-save plugin, by name)."""

import tempfile
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memvisor.contents import ContentSpec
from memvisor.events import RestoreRequest, SaveRequest
from memvisor.testing import ReferenceMemory, small_host
from memvisor_lazy_restore import LazyRestorePlugin

mixes = st.sampled_from([{"zero": 1.0}, {"random": 1.0}, {"zero": 0.5, "text": 0.3, "random": 0.2},
                         {"zero": 0.3, "text": 0.7, "run_pages": 32}])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pages=st.integers(1, 3000), mix=mixes, block_pages=st.sampled_from([1, 16, 64]),
       buffer_bytes=st.sampled_from([1, 64 << 10, 4 << 20]), window=st.sampled_from([1, 7, 64, 256]),
       prefetch=st.sampled_from(["hot", "file", "off"]), rounds=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_stop_the_world_save_then_lazy_restore_gives_back_every_page(pages, mix, block_pages, buffer_bytes, window,
                                                                     prefetch, rounds, seed):
    """A lazy restore serves every page with the saved bytes, and the guest's writes after
    resuming survive the prefetcher."""
    settings_ = {"lazy-restore": {"prefetch": prefetch, "window_pages": window}}
    host = small_host(memory_pages=2 * pages + 1024, extra_plugins=[LazyRestorePlugin()], settings=settings_,
                      tick_interval=0.0005)
    vm = host.create_vm("a", pages, contents=ContentSpec.parse(mix, "test"), seed=seed)
    model = ReferenceMemory()
    model.follow(host, vm)
    saved = model.expected["a"].copy()
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "a.ckpt")
        host.save_checkpoint(vm, SaveRequest(path, lazy=False, block_pages=block_pages, buffer_bytes=buffer_bytes))
        model.access(host, vm, rng.integers(0, pages, 100), rng.random(100) < 0.5)  # diverge, then go back
        job = host.restore_checkpoint(vm, RestoreRequest(path))
        assert job.method == "lazy"
        model.expected["a"] = saved
        for _ in range(rounds):
            model.access(host, vm, rng.integers(0, pages, 50), rng.random(50) < 0.5)
            host.advance(host.tick_interval)
        model.check(host)
        host.stop()
    assert host.backend.check_invariants() == 0


def _lazy_save_installed() -> bool:
    return any(ep.name == "lazy-save" for ep in entry_points(group="memvisor"))


@pytest.mark.parametrize("lazy_save", [False, True], ids=["stop-the-world", "lazy-save"])
@pytest.mark.parametrize("lazy_restore", [False, True], ids=["eager", "lazy-restore"])
def test_every_save_restores_with_every_restore(tmp_path, lazy_save, lazy_restore):
    """{stop-the-world, lazy} save x {eager, lazy} restore: byte for byte, guest writes during a
    lazy save included (the file holds the save's start)."""
    if lazy_save and not _lazy_save_installed():
        pytest.skip("memvisor-lazy-save is not installed")
    plugins = ["lazy-restore"] + (["lazy-save"] if lazy_save else [])
    host = small_host(memory_pages=40960, plugins=plugins)
    vm = host.create_vm("a", 8192, contents=ContentSpec.parse({"zero": 0.4, "text": 0.4, "random": 0.2}, "t"))
    model = ReferenceMemory()
    model.follow(host, vm)
    saved = model.expected["a"].copy()
    path = str(tmp_path / "a.ckpt")
    rng = np.random.default_rng(11)
    job = host.save_checkpoint(vm, SaveRequest(path, lazy=lazy_save))
    assert job.method == ("lazy" if lazy_save else "stop-the-world")
    while not job.done:
        model.access(host, vm, rng.integers(0, vm.pages, 1000), rng.random(1000) < 0.5)
        host.advance(host.tick_interval / 2)
    model.check(host)
    restore = host.restore_checkpoint(vm, RestoreRequest(path, lazy=lazy_restore))
    assert restore.method == ("lazy" if lazy_restore else "eager")
    model.expected["a"] = saved
    for _ in range(5):
        model.access(host, vm, rng.integers(0, vm.pages, 500), rng.random(500) < 0.5)
        host.advance(host.tick_interval)
    model.check(host)
    if lazy_save and lazy_restore:  # the lazy save's access order reached the restore
        assert restore.stats["prefetch_order"].startswith("hot")
    assert host.backend.check_invariants() == 0
