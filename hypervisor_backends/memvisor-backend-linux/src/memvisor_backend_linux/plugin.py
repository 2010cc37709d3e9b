"""Registers the ``linux`` backend and its benchmarks through the ``memvisor`` entry point."""

from memvisor import hookimpl


@hookimpl
def memvisor_register_backends(register):
    """The ``linux`` backend."""
    from memvisor_backend_linux.backend import LinuxBackend

    register("linux", LinuxBackend)


@hookimpl
def memvisor_register_benchmarks(register):
    """``memvisor bench linux``: fault round trips through userfaultfd against the wake-up floor."""
    from memvisor_backend_linux.bench import cases

    for case in cases():
        register("linux", case)
