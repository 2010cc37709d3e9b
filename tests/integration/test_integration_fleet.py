"""examples/fleet-host.toml scaled down: the identity model gives the bytes model's answers on
it, every technique on, and both run clean."""

from memvisor.runner import ScenarioRun
from memvisor.scenario import parse_scenario
from memvisor_backend_emulator.fleet import fleet_scenario


def figures(model: str) -> dict:
    """The fleet at 2 GiB (runs shortened) in ``model``: what the two models are compared on."""
    report = ScenarioRun(parse_scenario(fleet_scenario(2, model, run_factor=0.25), "fleet")).run().data
    sections = {(s["plugin"], s["title"]): s["metrics"] for s in report["sections"]}
    moves = sections[("memvisor", "Live migrations and memory errors")]
    return {
        "reclaimed": [e["reclaimed_pages"] for e in report["core"]["events"] if e["kind"] == "memory_pressure"],
        "by_technique": sections[("memvisor", "Memory, reclaim and reliability")]["reclaimed_under_pressure_mib"],
        "checkpoint": next(j for j in sections[("memvisor", "Checkpoints")]["jobs"] if j["method"] == "stop-the-world"),
        "migration": moves["migrations"][0],
        "errors": sections[("balloon", "Ballooning")]["guest_visible_errors"],
        "failures": sections[("memvisor", "Memory, reclaim and reliability")]["plugin_failures"],
        "repaired": moves["memory_error_repaired"],
    }


def test_the_identity_model_gives_the_bytes_models_answers_on_the_fleet():
    """Every technique on, the same scenario in both models: the reclaimers free the same pages
    at every pressure event; the checkpoint writes and the migration sends within 5% of the
    bytes; no guest-visible error, no plugin failure, the migration verified, memory errors
    repaired alike."""
    ident, plain = figures("identity"), figures("bytes")
    assert ident["reclaimed"] == plain["reclaimed"] and sum(plain["reclaimed"]) > 0
    assert ident["by_technique"] == plain["by_technique"]
    for key in ("zero_pages", "data_pages", "write_calls"):
        assert ident["checkpoint"][key] == plain["checkpoint"][key], key
    assert abs(ident["checkpoint"]["bytes_out"] / plain["checkpoint"]["bytes_out"] - 1) < 0.05
    assert ident["checkpoint"]["file_bytes"] < plain["checkpoint"]["file_bytes"] / 20
    assert abs(ident["migration"]["bytes_sent"] / plain["migration"]["bytes_sent"] - 1) < 0.05
    assert ident["migration"]["verified"] and plain["migration"]["verified"]
    assert ident["errors"] == plain["errors"] == 0 and ident["failures"] == plain["failures"] == 0
    assert ident["repaired"] == plain["repaired"]
