"""The reference model of guest memory: what every guest page must read.

Techniques move, share, drop, compress and restore pages; none may change what a guest reads
except the guest's own writes. Drive the guest through a :class:`ReferenceMemory` and call
:meth:`ReferenceMemory.check` after any step: it reads every page the way the guest would and
compares with the model.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from memvisor import PAGE_SIZE


class ReferenceMemory:
    """Expected contents of every page of the VMs it follows (dense arrays: small VMs only)."""

    def __init__(self) -> None:
        self.expected: dict[str, np.ndarray] = {}

    def follow(self, host, vm) -> None:
        """Start following ``vm``: its current contents are what it must read from now on
        (every page must be present)."""
        self.expected[vm.name] = np.array(host.backend.read(vm, np.arange(vm.pages)), copy=True)

    def follow_all(self, host) -> None:
        """Follow every VM of the host."""
        for vm in host.vms.values():
            self.follow(host, vm)

    def access(self, host, vm, gpps, writes, *, within_budget=False):
        """Run a batch of guest accesses and mirror its writes (the stamp of
        :meth:`memvisor.backend.Backend.access`); with ``within_budget``, only the accesses the
        VM's trap budget let run (``result.accesses`` of them)."""
        gpps = host.guest_pages(vm, gpps)  # where the guest's allocator puts them
        writes = np.asarray(writes, dtype=bool)
        result = host.access(vm, gpps, writes, within_budget=within_budget)
        gpps, writes = gpps[: result.accesses], writes[: result.accesses]
        written = gpps[writes]
        if len(written):
            stamp = np.frombuffer(np.uint64(vm.write_epoch).tobytes(), dtype=np.uint8)
            self.expected[vm.name][written, :8] = stamp
        return result

    def guest_write(self, host, vm, gpps, data) -> None:
        """The guest writes whole pages."""
        gpps = np.asarray(gpps, dtype=np.int64)
        data = np.asarray(data, dtype=np.uint8).reshape(len(gpps), PAGE_SIZE)
        host.backend.guest_write(vm, gpps, data)
        self.expected[vm.name][gpps] = data

    def forget(self, vm) -> None:
        """Stop following a VM (destroyed)."""
        self.expected.pop(vm.name, None)

    def mismatches(self, host, vms: Iterable | None = None) -> dict[str, np.ndarray]:
        """Pages that read otherwise than expected, by VM (read the way the guest reads:
        faults are served, traced pages trap)."""
        out = {}
        for vm in vms or [host.vms[n] for n in self.expected if n in host.vms]:
            got = host.backend.guest_read(vm, np.arange(vm.pages))
            bad = np.flatnonzero(np.any(got != self.expected[vm.name], axis=1))
            if len(bad):
                out[vm.name] = bad
        return out

    def check(self, host, vms: Iterable | None = None) -> None:
        """Assert that every followed page reads what the model says."""
        bad = self.mismatches(host, vms)
        assert not bad, "guest memory differs from the reference model: " + "; ".join(
            f"VM {name}: {len(pages)} pages, first {pages[:8].tolist()}" for name, pages in bad.items())


def small_host(*, memory_pages: int = 8192, numa_nodes: int = 1, plugins: Iterable[str] = (),
               extra_plugins: Iterable[object] = (), settings: dict | None = None, seed: int = 0,
               backend: str = "emulator", tick_interval: float = 0.01, backend_options: dict | None = None,
               contents: str | None = None):
    """A small host for tests: ``memory_pages`` of machine memory on the emulator by default,
    with installed ``plugins`` by name and ``extra_plugins`` objects registered; ``backend_options``
    are the backend's own settings (the emulator's ``costs``, the linux backend's ``dirty``);
    ``contents`` the machine model (``"bytes"``, the default for small hosts, or ``"identity"``)."""
    from memvisor.host import Host, HostConfig

    config = HostConfig(memory_pages=memory_pages, numa_nodes=numa_nodes, backend=backend, seed=seed,
                        tick_interval=tick_interval, plugin_settings=settings or {},
                        backend_options=backend_options or {}, contents=contents)
    return Host(config, plugins, extra_plugins=extra_plugins)


def listed_plugin(name: str) -> dict:
    """The row of ``memvisor plugins --json`` for plugin ``name``, from a fresh process (as a
    user sees it); fails the test when the plugin is not listed exactly once."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "memvisor", "plugins", "--json", "-"], check=True,
                         capture_output=True, text=True).stdout
    rows = [row for row in json.loads(out) if row["name"] == name]
    assert len(rows) == 1, f"plugin {name!r} is listed {len(rows)} times by `memvisor plugins --json`"
    return rows[0]
