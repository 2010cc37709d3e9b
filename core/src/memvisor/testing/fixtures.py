"""pytest fixtures for plugin authors, registered through the ``pytest11`` entry point.

``memvisor_host``
    A factory: ``memvisor_host(plugins=("mine",), memory_pages=8192, ...)`` returns a small
    emulated :class:`memvisor.host.Host` (see :func:`memvisor.testing.small_host`).
``hook_recorder``
    A factory: ``hook_recorder(host)`` returns a :class:`memvisor.testing.HookRecorder` that
    stops recording when the test ends.
``reference_memory``
    A fresh :class:`memvisor.testing.ReferenceMemory`.

Imports stay inside the fixtures: pytest loads this module in every run.
"""

import pytest


@pytest.fixture
def memvisor_host():
    """Factory of small hosts: ``memvisor_host(**kwargs)`` is
    :func:`memvisor.testing.small_host` — ``memory_pages`` (8192), ``numa_nodes`` (1),
    ``plugins`` (installed plugins by name), ``extra_plugins`` (plugin objects, such as the
    instance under test), ``settings`` (``{"NAME": {...}}``, checked as a scenario's tables
    are), ``seed``, ``backend`` (``"emulator"``), ``tick_interval`` and ``backend_options``.
    Cause memory pressure with ``host.check_pressure(target_free_pages=N)``."""
    from memvisor.testing import small_host

    return small_host


@pytest.fixture
def hook_recorder():
    """Factory of hook recorders: ``hook_recorder(host)`` is a
    :class:`memvisor.testing.HookRecorder` of every hook call through ``host``, closed at the
    end of the test."""
    from memvisor.testing import HookRecorder

    recorders = []

    def make(host):
        recorder = HookRecorder(host.pm)
        recorders.append(recorder)
        return recorder

    yield make
    for recorder in recorders:
        recorder.close()


@pytest.fixture
def reference_memory():
    """A fresh :class:`memvisor.testing.ReferenceMemory`: ``follow(host, vm)``, guest batches
    through its ``access``, then ``check(host)``."""
    from memvisor.testing import ReferenceMemory

    return ReferenceMemory()
