"""Registers the emulator backend and its benchmarks, through the same hooks a third-party
backend would use."""

from memvisor import hookimpl


@hookimpl
def memvisor_register_backends(register):
    """The ``emulator`` backend."""
    from memvisor_backend_emulator.backend import EmulatorBackend

    register("emulator", EmulatorBackend)


@hookimpl
def memvisor_register_benchmarks(register):
    """``memvisor bench emulator``: guest accesses per second, untraced and with 1% traced;
    ``memvisor bench scale``: the identity model at 1 GiB to 1 TiB, beside the bytes model."""
    from memvisor_backend_emulator import bench, scale

    for case in bench.cases():
        register("emulator", case)
    for case in scale.cases():
        register("scale", case)
