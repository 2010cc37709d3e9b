"""examples/sweep.toml (it needs memvisor-numa and memvisor-stats beside memvisor-sweep)."""

from pathlib import Path

from memvisor_sweep import Axis, load_sweep


def test_example_sweep_file_is_valid():
    """examples/sweep.toml loads and its whole plan checks, the plugins' settings included."""
    example = Path(__file__).resolve().parents[1] / "examples" / "sweep.toml"
    spec = load_sweep(example)
    assert len(spec.check()) >= 8 and all(isinstance(a, Axis) for a in spec.axes)
