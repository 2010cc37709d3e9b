"""memvisor's emulator backend: real page bytes, virtual time, deterministic under a seed."""

from memvisor_backend_emulator.backend import EmulatorBackend
from memvisor_backend_emulator.costs import CostModel

__all__ = ["CostModel", "EmulatorBackend"]
