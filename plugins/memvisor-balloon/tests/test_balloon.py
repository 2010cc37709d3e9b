"""memvisor-balloon: balloon pages share one page, a write to it resets the balloon, deflate
returns pages cleanly, and exactly the right machine pages are reclaimed."""


import numpy as np
import pytest
from structlog.testing import capture_logs

from memvisor import PAGE_SIZE
from memvisor.errors import UserError
from memvisor.testing import ReferenceMemory, listed_plugin, small_host
from memvisor_balloon import BalloonPlugin

VM_PAGES = 1024


def test_balloon_is_listed_by_memvisor_plugins():
    """The plugin appears in `memvisor plugins --json` with the hooks it implements."""
    row = listed_plugin("balloon")
    assert row["distribution"] == "memvisor-balloon"
    for hook in ("memvisor_write_trap", "memvisor_memory_pressure", "memvisor_report", "memvisor_register_actions"):
        assert hook in row["hooks"]


def make(settings=None, memory_pages=8192, vm_pages=VM_PAGES, contents=True, large_pages=False):
    """A host with the balloon plugin and one VM of random bytes, followed by a reference model."""
    plugin = BalloonPlugin()
    host = small_host(memory_pages=memory_pages, extra_plugins=[plugin], settings={"balloon": settings or {}})
    vm = host.create_vm("a", vm_pages, large_pages=large_pages)
    if contents:
        data = np.random.default_rng(1).integers(1, 256, (vm_pages, PAGE_SIZE), dtype=np.uint8)
        host.backend.write(vm, np.arange(vm_pages), data)
    ref = ReferenceMemory()
    ref.follow(host, vm)
    return host, vm, plugin, ref


def balloon(plugin, ref, vm, count):
    """Inflate and tell the model: the guest gave those pages up, they read zeros now."""
    freed = plugin.inflate(vm, count)
    ref.expected[vm.name][plugin.balloon_pages(vm)] = 0
    return freed


def test_inflate_remaps_onto_one_zero_filled_page_and_frees_exactly_their_machine_pages():
    """Inflating by n private pages frees n machine pages less the one balloon page; every
    balloon page maps that page, which reads zeros and is counted once per balloon page."""
    host, vm, plugin, ref = make()
    backend = host.backend
    free = backend.free_pages()
    assert balloon(plugin, ref, vm, 300) == 299
    assert backend.free_pages() == free + 299
    st = plugin.state(vm)
    assert st.size == 300 and st.reclaimed == 299
    assert np.all(backend.mpns(vm, st.order) == st.mpn)
    assert backend.refcounts(np.array([st.mpn]))[0] == 301
    assert host.guest_pinned(vm)[st.order].all()
    assert not backend.read(vm, st.order).any()
    assert balloon(plugin, ref, vm, 100) == 100  # the balloon page exists already
    assert backend.check_invariants() == 1  # the balloon page is the only held page
    ref.check(host)


def test_the_driver_balloons_idle_pages_first():
    """Pages the guest has not touched since the last accessed-bit sample go first."""
    host, vm, plugin, ref = make(contents=False)
    hot = np.arange(0, VM_PAGES, 2)
    host.backend.take_accessed(vm)
    host.access(vm, hot, np.zeros(len(hot), bool))
    host.advance(host.tick_interval)  # the first tick samples accessed bits
    plugin.inflate(vm, 200)
    assert np.all(plugin.balloon_pages(vm) % 2 == 1)


def test_deflate_returns_pages_cleanly():
    """Deflating hands pages back to the guest: they read zeros, their next write is an
    ordinary private page (no reset), and a fully deflated balloon holds no machine page."""
    host, vm, plugin, ref = make()
    backend = host.backend
    balloon(plugin, ref, vm, 300)
    free = backend.free_pages()
    assert plugin.deflate(vm, 100) == 100
    returned = np.setdiff1d(np.arange(VM_PAGES), plugin.balloon_pages(vm))
    assert plugin.state(vm).size == 200 and not host.guest_pinned(vm)[returned].any()
    assert backend.free_pages() == free  # returned pages map the zero page until written
    ref.check(host)
    gone = np.setdiff1d(returned, np.flatnonzero(ref.expected["a"].any(axis=1)))[:5]
    ref.guest_write(host, vm, gone, np.full((len(gone), PAGE_SIZE), 7, np.uint8))
    assert plugin.resets == 0 and backend.free_pages() == free - len(gone)
    plugin.set_target(vm, 0)
    assert plugin.state(vm).size == 0 and plugin.state(vm).mpn == -1
    assert backend.check_invariants() == 0
    ref.check(host)


def test_write_after_a_driver_reset_resets_every_balloon_page():
    """A driver reset makes balloon pages ordinary memory; the guest's first write to one of
    them resets the whole balloon: the write lands in a private page, the other pages read
    zeros, nothing else changes, the reset is logged and counted, and no page leaks."""
    host, vm, plugin, ref = make()
    backend = host.backend
    balloon(plugin, ref, vm, 300)
    pages = plugin.balloon_pages(vm)
    plugin.reset_driver(vm)
    free = backend.free_pages()
    with capture_logs() as logs:
        ref.access(host, vm, pages[:1], np.ones(1, bool))
    assert plugin.resets == 1 and plugin.state(vm).size == 0
    assert [e for e in logs if e["event"] == "balloon reset"][0]["pages"] == 300
    # The balloon page was released (+1), the written page got a private copy (-1).
    assert backend.free_pages() == free
    assert backend.refcounts(backend.mpns(vm, pages[:1]))[0] == 1
    assert np.all(backend.mpns(vm, pages[1:]) == backend.zero_mpn)
    assert backend.check_invariants() == 0
    ref.check(host)
    # Later writes to former balloon pages are ordinary zero-page copy-on-write.
    ref.access(host, vm, pages[1:3], np.ones(2, bool))
    assert plugin.resets == 1 and backend.free_pages() == free - 2
    ref.check(host)


def test_a_guest_write_while_the_driver_holds_pages_resets_the_driver_too():
    """A write that reaches a balloon page the driver still holds resets the balloon and the
    driver (the hypervisor restarts the balloon application); the write lands privately."""
    host, vm, plugin, ref = make()
    balloon(plugin, ref, vm, 50)
    page = plugin.balloon_pages(vm)[10:11]
    ref.guest_write(host, vm, page, np.full((1, PAGE_SIZE), 9, np.uint8))
    assert plugin.resets == 1 and plugin.state(vm).driver.size == 0 and not host.guest_pinned(vm).any()
    assert host.backend.check_invariants() == 0
    ref.check(host)


def test_a_write_to_another_shared_page_does_not_reset_the_balloon():
    """Writes to pages shared by someone else (two equal pages merged, a zero-page mapping)
    trap as shared writes but leave the balloon alone."""
    host, vm, plugin, ref = make()
    backend = host.backend
    balloon(plugin, ref, vm, 100)
    free_pages = np.setdiff1d(np.arange(VM_PAGES), plugin.balloon_pages(vm))
    a, b, z = free_pages[:3]
    ref.guest_write(host, vm, [b], backend.read(vm, [a]))  # make b equal to a, then share them
    backend.share(vm, np.array([b]), backend.mpns(vm, [a]))
    ref.guest_write(host, vm, [z], np.zeros((1, PAGE_SIZE), np.uint8))
    backend.share(vm, np.array([z]), np.array([backend.zero_mpn]))
    writes = ref.access(host, vm, np.array([a, b, z]), np.ones(3, bool)).write_traps
    assert writes == 3 and plugin.resets == 0 and plugin.state(vm).size == 100
    assert backend.check_invariants() == 1
    ref.check(host)


def test_eager_reset_gives_private_zero_filled_pages():
    """With reset = "eager" every balloon page gets its own zero-filled machine page at once."""
    host, vm, plugin, ref = make({"reset": "eager"})
    backend = host.backend
    balloon(plugin, ref, vm, 300)
    pages = plugin.balloon_pages(vm)
    plugin.reset_driver(vm)
    free = backend.free_pages()
    ref.access(host, vm, pages[:1], np.ones(1, bool))
    assert backend.free_pages() == free - 299  # 300 private pages, the balloon page released
    assert np.all(backend.refcounts(backend.mpns(vm, pages)) == 1)
    assert backend.check_invariants() == 0
    ref.check(host)


def test_one_gib_inflate_and_reset_reclaim_exact_page_counts():
    """The benchmark's operations on 262,144 pages: inflating frees exactly 262,143 machine
    pages (one is the balloon page); the reset after one write frees the balloon page and
    copies the written one."""
    from memvisor_balloon.bench import BALLOON_PAGES, _fresh

    host, vm, plugin = _fresh()
    backend = host.backend
    free = backend.free_pages()
    assert plugin.inflate(vm, BALLOON_PAGES) == BALLOON_PAGES - 1
    assert backend.free_pages() == free + BALLOON_PAGES - 1
    first = plugin.state(vm).order[:1]
    plugin.reset_driver(vm)
    host.access(vm, first, np.ones(1, bool))
    assert plugin.state(vm).size == 0 and backend.free_pages() == free + BALLOON_PAGES - 1
    assert backend.check_invariants() == 0


def test_large_pages_are_split_before_ballooning():
    """Balloon pages inside a 2 MiB large page are split off; the rest still reads right."""
    host, vm, plugin, ref = make(vm_pages=1024, large_pages=True)
    balloon(plugin, ref, vm, 100)
    assert not host.backend.large(vm, plugin.balloon_pages(vm)).any()
    assert host.backend.check_invariants() == 1
    ref.check(host)


def test_vm_destroyed_releases_the_balloon_page():
    """Destroying a VM with a balloon leaves no held machine page behind."""
    host, vm, plugin, ref = make()
    plugin.inflate(vm, 10)
    host.destroy_vm(vm)
    assert host.backend.check_invariants() == 0 and "a" not in plugin.vms


@pytest.mark.parametrize("settings, key", [
    ({"policy": "fastest"}, "plugins.balloon.policy"),
    ({"tax_rate": 1.5}, "plugins.balloon.tax_rate"),
    ({"reset": "never"}, "plugins.balloon.reset"),
    ({"shares": {"a": -1}}, "plugins.balloon.shares.a"),
    ({"colour": "red"}, "plugins.balloon.colour"),
])
def test_bad_settings_are_one_line_naming_the_key(settings, key):
    """A mistake in [plugins.balloon] is one UserError line naming the dotted key."""
    with pytest.raises(UserError, match=key) as info:
        small_host(extra_plugins=[BalloonPlugin()], settings={"balloon": settings})
    assert "\n" not in str(info.value)
