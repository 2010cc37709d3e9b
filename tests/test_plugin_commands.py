"""A command of a plugin that is installed but left out by the allow- or block-list says where
it comes from (the core names no plugin: it asks the left-out plugins for their commands)."""

import os
import subprocess
import sys


def memvisor(*args, env=None):
    return subprocess.run([sys.executable, "-m", "memvisor", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_a_blocked_plugin_command_names_its_plugin_and_distribution():
    """`memvisor sharing estimate` with the plugin blocked: one line, not "No such command"."""
    proc = memvisor("sharing", "estimate", env={"MEMVISOR_DISABLE_PLUGINS": "sharing"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert ("'sharing' comes from plugin 'sharing' (memvisor-sharing): installed, but "
            "MEMVISOR_DISABLE_PLUGINS=sharing leaves it out") in proc.stderr


def test_an_unknown_command_is_clicks_one_line():
    """A command nobody provides is click's usage error, one line."""
    proc = memvisor("nosuchcommand")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "No such command" in proc.stderr
