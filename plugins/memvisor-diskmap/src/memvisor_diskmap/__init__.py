"""memvisor-diskmap: guest pages that equal disk blocks are kept as mappings GPP -> (disk, block)
and used by snapshots and live migration (references instead of contents), swap and
memory-error repair. See :mod:`memvisor_diskmap.plugin`."""

from __future__ import annotations

from memvisor import hookimpl
from memvisor_diskmap.plugin import KIND
from memvisor_diskmap.plugin import DiskmapPlugin as _Plugin

__all__ = ["KIND", "DiskmapPlugin"]


class DiskmapPlugin(_Plugin):
    """The plugin with its registrations: the ``diskmap`` command and the migration benchmarks."""

    @hookimpl
    def memvisor_register_commands(self, cli):
        """Add ``memvisor diskmap scan``."""
        from memvisor_diskmap.cli import diskmap

        cli.add_command(diskmap)

    @hookimpl
    def memvisor_register_benchmarks(self, register):
        """``memvisor bench migration``: bytes and time with and without diskmap; scan speed."""
        from memvisor_diskmap.bench import cases

        for case in cases():
            register("migration", case)
