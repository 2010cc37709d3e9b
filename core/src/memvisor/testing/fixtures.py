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
    """Factory of small emulated hosts."""
    from memvisor.testing import small_host

    return small_host


@pytest.fixture
def hook_recorder():
    """Factory of hook recorders, closed at the end of the test."""
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
    """A fresh reference model of guest memory."""
    from memvisor.testing import ReferenceMemory

    return ReferenceMemory()
