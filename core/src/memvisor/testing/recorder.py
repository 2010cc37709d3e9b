"""Recording hook calls, for tests (like pytest's ``HookRecorder``)."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class HookCall:
    """One recorded hook call: the hook's name and its keyword arguments."""

    name: str
    kwargs: dict[str, Any]

    def __getattr__(self, key: str) -> Any:
        try:
            return self.kwargs[key]
        except KeyError:
            raise AttributeError(key) from None


class HookRecorder:
    """Records every hook call made through a plugin manager until :meth:`close`.

    :param pm: the plugin manager (``host.pm``).
    """

    def __init__(self, pm) -> None:
        self.calls: list[HookCall] = []
        self._undo = pm.add_hookcall_monitoring(self._before, lambda *args: None)

    def _before(self, hook_name, hook_impls, kwargs) -> None:
        self.calls.append(HookCall(hook_name, dict(kwargs)))

    def close(self) -> None:
        """Stop recording."""
        self._undo()

    def of(self, name: str) -> list[HookCall]:
        """Calls of hook ``name`` in order."""
        return [c for c in self.calls if c.name == name]

    def names(self) -> list[str]:
        """Names of the hooks called, in call order."""
        return [c.name for c in self.calls]

    def clear(self) -> None:
        """Forget what was recorded."""
        self.calls.clear()
