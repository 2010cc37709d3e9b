"""Errors that memvisor reports to people (one line, exit status 2) rather than as tracebacks."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from a person: a scenario, a trace file, a plugin name, a command-line value.

    The CLI prints ``str(error)`` as one line and exits with status 2. The message names the input
    and what is wrong with it.
    """


class ScenarioError(UserError):
    """A scenario file that cannot be run: the message names the file, the key and the problem."""

    def __init__(self, path, key: str, problem: str):
        self.path, self.key, self.problem = path, key, problem
        super().__init__(f"{path}: {key}: {problem}" if key else f"{path}: {problem}")

    @classmethod
    def within(cls, path, error: Exception) -> ScenarioError:
        """The scenario error of ``error``, raised by a parser of one value whose message
        already starts with the key (``vm[0].contents: zero: ...``): the file is put in front,
        the key is not repeated."""
        key, sep, problem = str(error).partition(": ")
        return cls(path, key, problem) if sep and " " not in key else cls(path, "", str(error))


class TraceError(UserError):
    """A trace file that is not a trace (wrong format, dtype, empty or truncated)."""


class PluginError(UserError):
    """An unknown plugin or backend, a duplicate backend name, or a plugin that failed to load."""


class CapabilityError(UserError):
    """A plugin needs a backend capability that the selected backend does not offer."""


class BackendError(Exception):
    """A backend operation was asked to do something that would corrupt guest memory.

    This is a bug in the caller (a plugin or the core), not bad user input.
    """


class VMStoppedError(UserError):
    """A VM was stopped cleanly (a plugin failed where no safe fallback exists, or a restore
    could not go on): the message names the VM and the reason. Its guest runs no more."""


class GuestDied(VMStoppedError, BackendError):
    """A VM's guest died outside memvisor's control (its process was killed): the message names
    the VM and how it died. A scenario run ends there, and :attr:`report` holds the report of
    what ran (set by :meth:`memvisor.runner.ScenarioRun.run`)."""

    report = None
    """The report of what ran before the guest died, or None."""
