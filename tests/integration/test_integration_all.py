"""Every technique at once: the integration state machine of memvisor.testing.integration with
a bounded CI budget (``memvisor selftest --long`` runs it for longer)."""

import os

from memvisor.testing.integration import run

EXAMPLES = int(os.environ.get("MEMVISOR_INTEGRATION_EXAMPLES", "30"))


def test_integration_all_techniques():
    """Random interleavings of every technique keep every guest page and machine page exact
    after every step, and at the end every page reads right the way the guest reads it
    (faults served) — derandomized: CI runs the same examples each time; selftest explores."""
    figures = run(max_examples=EXAMPLES, steps=30, seed=0, final_fault_check=True)
    assert figures["examples"] >= 1


def test_integration_all_techniques_on_the_identity_model():
    """The same on hosts that keep pages by content identity: every technique keeps every page
    reading the bytes the model says (checkpoints of identities, identity migration records,
    identity disks, literal pages from memory errors)."""
    figures = run(max_examples=max(1, EXAMPLES // 2), steps=30, seed=0, final_fault_check=True, model="identity")
    assert figures["examples"] >= 1
