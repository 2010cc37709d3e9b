"""Every technique at once: the integration state machine of memvisor.testing.integration with
a bounded CI budget (``memvisor selftest --long`` runs it for longer)."""

import os

import pytest

from memvisor.testing.integration import run

EXAMPLES = int(os.environ.get("MEMVISOR_INTEGRATION_EXAMPLES", "30"))


def test_integration_all_techniques():
    """Random interleavings of every technique keep every guest page and machine page exact
    after every step (derandomized: CI runs the same examples each time; selftest explores)."""
    figures = run(max_examples=EXAMPLES, steps=30, seed=0, final_fault_check=False)
    assert figures["examples"] >= 1


@pytest.mark.xfail(reason="open finding (docs/reliability.md): rarely, after the host stops, a page "
                          "that was not present is served with other bytes than the model's", strict=False)
def test_integration_all_techniques_final_fault_in():
    """The same, and at the end every page read the way the guest reads it (faults served)."""
    run(max_examples=EXAMPLES, steps=30, seed=0, final_fault_check=True)
