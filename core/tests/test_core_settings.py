"""Plugin settings declared once (memvisor.settings): the core checks a table against the
declaration, fills the defaults and hands the plugin a typed, frozen object."""

from collections.abc import Mapping

import attrs
import pytest

from memvisor import hookimpl
from memvisor.errors import PluginError, UserError
from memvisor.settings import Duration, SettingError, Size, as_json, declared, load, render_markdown, setting
from memvisor.testing import small_host


def _no_dup(groups):
    names = [n for g in groups for n in g]
    return "a name is in two groups" if len(names) != len(set(names)) else None


@attrs.frozen
class Example:
    """Every kind of setting."""

    mode: str = setting("fast", choices=("fast", "slow"), doc="How.")
    count: int = setting(8, low=1, high=100, doc="How many.")
    share: float = setting(0.5, above=0.0, high=1.0, doc="How much.")
    on: bool = setting(True, doc="Whether.")
    buffer: Size = setting(4 << 20, low=4096, doc="How big.")
    every: Duration = setting(0.05, above=0.0, doc="How often.")
    limit: int | None = setting(None, low=0, doc="At most.", host_dependent="default: the host's memory.")
    ratios: tuple[float, ...] = setting((0.1, 0.01), low=0.0, high=1.0, min_items=1, doc="Levels.")
    weights: Mapping[str, float] = setting({}, above=0.0, doc="Per name.")
    groups: tuple[tuple[str, ...], ...] = setting((), check=_no_dup, doc="Groups of names.")


def test_defaults_are_filled_and_values_converted():
    """An empty table gives the defaults; sizes and durations are read in the scenario syntax."""
    assert load(Example, {}, "plugins.x") == Example()
    got = load(Example, {"buffer": "1MiB", "every": "10ms", "count": 3, "share": 1, "ratios": [0.5],
                         "weights": {"a": 2}, "groups": [["a", "b"], ["c"]], "limit": 7}, "plugins.x")
    assert got.buffer == 1 << 20 and got.every == pytest.approx(0.01) and got.share == 1.0
    assert isinstance(got.share, float) and got.ratios == (0.5,) and got.weights["a"] == 2.0
    assert got.groups == (("a", "b"), ("c",)) and got.limit == 7
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        got.count = 4
    assert as_json(got)["groups"] == [["a", "b"], ["c"]] and as_json(got)["weights"] == {"a": 2.0}


@pytest.mark.parametrize("table, key, problem", [
    ({"cuont": 1}, "plugins.x.cuont", "unknown setting (did you mean 'count'?)"),
    ({"mode": "fsat"}, "plugins.x.mode", "must be one of fast, slow, got 'fsat' (did you mean 'fast'?)"),
    ({"count": 0}, "plugins.x.count", "must be from 1 to 100, got 0"),
    ({"count": 2.5}, "plugins.x.count", "must be a whole number, got 2.5"),
    ({"count": True}, "plugins.x.count", "must be a whole number, got True"),
    ({"count": 2**70}, "plugins.x.count", "must fit in 64 bits"),
    ({"share": 0}, "plugins.x.share", "must be above 0.0 and at most 1.0, got 0"),
    ({"share": float("nan")}, "plugins.x.share", "must be a finite number, got nan"),
    ({"share": float("inf")}, "plugins.x.share", "must be a finite number, got inf"),
    ({"on": "yes"}, "plugins.x.on", "must be true or false"),
    ({"buffer": "1GB"}, "plugins.x.buffer", "decimal unit"),
    ({"buffer": "1KiB"}, "plugins.x.buffer", "must be at least \"4.0KiB\""),
    ({"every": "soon"}, "plugins.x.every", "is not a duration"),
    ({"every": float("inf")}, "plugins.x.every", "finite"),
    ({"ratios": []}, "plugins.x.ratios", "must have at least 1 item"),
    ({"ratios": [0.5, 2]}, "plugins.x.ratios[1]", "must be from 0.0 to 1.0, got 2"),
    ({"weights": {"a": -1}}, "plugins.x.weights.a", "must be above 0.0"),
    ({"weights": [1]}, "plugins.x.weights", "must be a table"),
    ({"groups": [["a"], ["a"]]}, "plugins.x.groups", "a name is in two groups"),
])
def test_a_bad_value_is_one_line_naming_the_dotted_key(table, key, problem):
    """Unknown keys, wrong types, values out of bounds, NaN and infinities: one line, the key."""
    with pytest.raises(SettingError) as info:
        load(Example, table, "plugins.x")
    assert info.value.key == key and problem in info.value.problem and "\n" not in str(info.value)
    assert str(info.value).startswith(f"{key}: ")


def test_a_declaration_must_document_every_field_with_a_supported_type():
    """A field not made with setting(), or of a type the core cannot check, is refused."""

    @attrs.frozen
    class Plain:
        count: int = 3

    @attrs.frozen
    class Odd:
        when: complex = setting(1j, doc="?")

    with pytest.raises(TypeError, match="not made with memvisor.settings.setting"):
        declared(Plain)
    with pytest.raises(TypeError, match="unsupported setting type"):
        declared(Odd)


def test_the_declaration_shows_types_defaults_and_bounds_in_scenario_syntax():
    """The generated docs and `memvisor plugins --settings` show each setting as a scenario writes it."""
    rows = {s.name: s for s in declared(Example)}
    assert rows["every"].type_name == "duration" and rows["every"].default_text == '"50ms"'
    assert rows["buffer"].type_name == "size" and rows["buffer"].default_text == '"4.0MiB"'
    assert rows["ratios"].type_name == "array of float" and rows["ratios"].allowed_text == \
        "from 0.0 to 1.0, at least 1 item"
    assert rows["limit"].default_text == "(from the host)"
    text = render_markdown("x", Example)
    assert "| `mode` | str | `\"fast\"` | one of \"fast\", \"slow\" | How. |" in text
    assert "Host-dependent: default: the host's memory." in text


class Counting:
    """A plugin object (as tests register them) that declares its settings."""

    @hookimpl
    def memvisor_register_settings(self, register):
        register("counting", Example)

    @hookimpl
    def memvisor_host_started(self, host):
        self.settings = host.plugin_settings("counting")


def test_hook_memvisor_register_settings():
    """The host checks the table of a plugin that declares its settings (registered as an
    object here) and hands it the settings object."""
    plugin = Counting()
    small_host(extra_plugins=[plugin], settings={"counting": {"count": 5}})
    assert plugin.settings == Example(count=5)
    with pytest.raises(UserError, match=r"^plugins\.counting\.count: must be from 1 to 100, got 500$"):
        small_host(extra_plugins=[Counting()], settings={"counting": {"count": 500}})


def test_undeclared_plugins_get_their_table_as_it_is():
    """A plugin written before settings were declared still reads its table as a mapping."""

    class Old:
        @hookimpl
        def memvisor_host_started(self, host):
            self.every = host.plugin_settings("old").get("every", 64)

    plugin = Old()
    small_host(extra_plugins=[plugin], settings={"old": {"every": 8}})
    assert plugin.every == 8


def test_two_plugins_declaring_one_name_is_an_error():
    """The settings of a name are declared once."""

    class Twin(Counting):
        pass

    with pytest.raises(PluginError, match="settings of plugin 'counting' is registered twice"):
        small_host(extra_plugins=[Counting(), Twin()])
