"""memvisor's Linux backend: each guest is a process whose memory is a memfd mapping; memvisor
holds the guest's userfaultfd and serves its faults (see docs/backends/linux.md)."""

__version__ = "0.1.0"
