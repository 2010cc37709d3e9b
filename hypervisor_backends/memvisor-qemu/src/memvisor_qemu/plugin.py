"""The ``qemu`` plugin: the qemu backend, the ``memvisor qemu`` commands, ``memvisor bench
qemu``, and the heat of pages as QEMU's dirty tracking showed it."""

from __future__ import annotations

from memvisor import hookimpl


class QemuPlugin:
    """Registers the ``qemu`` backend and commands; answers ``memvisor_page_heat`` for VMs on it."""

    @hookimpl
    def memvisor_register_backends(self, register):
        """The ``qemu`` backend: a VM's memory is the RAM of QEMU's migration stream."""
        from memvisor_qemu.backend import QemuBackend

        register("qemu", QemuBackend)

    @hookimpl
    def memvisor_register_commands(self, cli):
        """``memvisor qemu save | restore | migrate``."""
        from memvisor_qemu.cli import qemu

        cli.add_command(qemu)

    @hookimpl
    def memvisor_register_benchmarks(self, register):
        """``memvisor bench qemu``: checkpoint bytes, lazy restore, page-request service and
        migration bytes, each against QEMU's own path in the same run."""
        from memvisor_qemu.bench import cases

        for case in cases():
            register("qemu", case)

    @hookimpl
    def memvisor_selftest(self, selftest):
        """Valid invocations of ``memvisor qemu save | restore | migrate`` for the CLI matrix
        (the sandbox's sockets have no QEMU behind them: the matrix's cases are refused before
        anything connects; tests/test_qemu_cli.py runs these against real QEMUs)."""
        selftest.command("qemu save", {"out": "{out}/vm.ckpt", "qmp": "{qmp}", "disk": "{disk}",
                                       "key_file": "{key}", "json_out": "{out}/save.json"})
        selftest.command("qemu restore", {"checkpoint": "{ckpt}", "qmp": "{qmp_incoming}", "disk": "{disk}",
                                          "key_file": "{key}", "json_out": "{out}/restore.json"})
        selftest.command("qemu migrate", {"source": "{qmp}", "target": "{qmp_incoming}", "disk": "{disk}",
                                          "json_out": "{out}/migrate.json"})

    @hookimpl(optionalhook=True)
    def memvisor_page_heat(self, host, vm, gpps):
        """On the qemu backend: how many times QEMU sent each page again in a later pre-copy
        round of a live save (it was written while being saved); None elsewhere."""
        backend = host.backend
        if getattr(backend, "name", None) != "qemu":
            return None
        return backend.heat(vm, gpps)
