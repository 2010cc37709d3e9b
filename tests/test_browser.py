"""The pages memvisor writes, opened in a real browser as a person would open them: the demo's
report.html, a compare page of two runs and a sweep's index.html, in headless Chromium (Debian's
``chromium``, which .ci/run installs; driven through Playwright's Python package, which
launches it and reports its console, its failed requests and the page's state).

Each page must load without a console error, a script error or a failed request; every image
must have loaded and every plot must have points; the report must show, in its first screen,
a card per VM with what each technique did for it. Screenshots are kept in
``build/test-artifacts/browser/`` (``MEMVISOR_TEST_ARTIFACTS`` elsewhere). The tests skip, with
the reason, only where chromium is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from memvisor.cli import _register_commands, cli
from memvisor.runner import ScenarioRun
from memvisor.scenario import parse_scenario
from memvisor.testing.report_checks import page_problems
from memvisor.testing.scaled import scaled

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SCALE = float(os.environ.get("MEMVISOR_EXAMPLE_SCALE", "0.25"))
ARTIFACTS = Path(os.environ.get("MEMVISOR_TEST_ARTIFACTS", REPO / "build" / "test-artifacts")) / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
"""Headless as root, and no connection of the browser's own (this machine's network refuses them)."""
SCREEN = {"width": 1440, "height": 900}
"""The first screen: a laptop's."""

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install "
                                                          "chromium; .ci/run installs it)")


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium with a fresh profile; ``open(page)`` loads a file and returns the
    Playwright page and every problem the browser reported while loading it."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="memvisor-chromium-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS, viewport=SCREEN)

        def open_page(path: Path):
            page = context.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"script error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
            page.goto(path.resolve().as_uri(), wait_until="load")
            return page, problems

        yield open_page
        context.close()


def _keep(page, name: str) -> Path:
    """A screenshot of the first screen and one of the whole page, kept as test artefacts."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png")
    page.screenshot(path=ARTIFACTS / f"{name}-full.png", full_page=True)
    return ARTIFACTS / f"{name}.png"


def _images_and_plots(page) -> list[str]:
    """Images that did not load, plots without a point, links to anchors that are not there."""
    images = page.eval_on_selector_all(
        "img", "imgs => imgs.map(i => ({src: i.getAttribute('src'), loaded: i.complete && i.naturalWidth > 0, "
               "points: i.dataset.points}))")
    problems = [f"image {i['src']} did not load" for i in images if not i["loaded"]]
    problems += [f"plot {i['src']} has no point" for i in images if i["points"] is not None and int(i["points"]) <= 0]
    anchors = page.eval_on_selector_all(
        "a[href^='#']", "links => links.filter(a => !document.getElementById(a.getAttribute('href').slice(1)))"
                        ".map(a => a.getAttribute('href'))")
    problems += [f"link {a} to no element" for a in anchors]
    return problems


def _run(name: str, folder: Path, change=None) -> Path:
    path = EXAMPLES / f"{name}.toml"
    data = scaled(tomllib.loads(path.read_text(encoding="utf-8")), SCALE)
    if change is not None:
        change(data)
    ScenarioRun(parse_scenario(data, path)).run().write(folder)
    return folder


def test_the_demo_report_opens_with_the_answer(browser, tmp_path):
    """The demo's report.html loads cleanly, and its first screen holds a card per VM with
    a sentence for each technique that acted on it, and the host's."""
    pytest.importorskip("memvisor_numa")
    page, problems = browser(_run("demo", tmp_path / "demo") / "report.html")
    _keep(page, "demo-report")
    assert not problems + _images_and_plots(page)
    cards = page.eval_on_selector_all(
        "#summary .card", "cards => cards.map(c => ({title: c.querySelector('h3').innerText, "
                          "bottom: c.getBoundingClientRect().bottom, items: c.querySelectorAll('li').length}))")
    data = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert [c["title"].split()[0] for c in cards] == [*data["vms"], "Host"]
    for card in cards:
        assert card["bottom"] <= SCREEN["height"], f"{card['title']} ends below the first screen"
        assert card["items"] >= 2, card
    assert page.evaluate("document.querySelector('#summary').getBoundingClientRect().top") < 250


def test_a_compare_page_loads_with_its_plots(browser, tmp_path):
    """`memvisor compare`'s page of two NUMA heuristics loads cleanly, with every overlaid plot."""
    pytest.importorskip("memvisor_numa")

    def random_order(data):
        data["plugins"]["numa"]["heuristic"] = "random"

    _run("numa", tmp_path / "scan")
    _run("numa", tmp_path / "random", random_order)
    _register_commands()
    done = CliRunner().invoke(cli, ["compare", str(tmp_path / "scan"), str(tmp_path / "random"),
                                    "--out", str(tmp_path / "cmp")])
    assert done.exit_code == 0, done.output
    page, problems = browser(tmp_path / "cmp" / "compare.html")
    _keep(page, "compare")
    assert not problems + _images_and_plots(page)
    assert page.locator("img").count() >= 3
    for link in page.eval_on_selector_all("#runs a", "links => links.map(a => a.href)"):
        linked, more = browser(Path(link.removeprefix("file://")))
        assert not more and linked.title().startswith("memvisor report: numa")
        linked.close()


SWEEP = """
name = "browser-sweep"
[vary]
"vm.db.workload" = [{ kind = "zipf", alpha = 0.99 }, { kind = "uniform" }]
[variants.policy.scan]
"plugins.numa.heuristic" = "scan"
[variants.policy.address]
"plugins.numa.heuristic" = "address"
[compare]
policy = "policy"
workload = "vm.db.workload"
[scenario]
name = "numa-move"
[scenario.host]
memory = "64MiB"
numa_nodes = 2
tick = "2ms"
batch = 4096
[scenario.plugins.numa]
[[scenario.vm]]
name = "db"
memory = "16MiB"
node = 1
[[scenario.timeline]]
do = "run"
for = "6ms"
[[scenario.timeline]]
do = "move_vcpus"
vm = "db"
node = 0
[[scenario.timeline]]
do = "run"
for = "20ms"
"""


def test_a_sweep_index_loads_with_its_plots(browser, tmp_path):
    """A sweep's index.html (2 policies x 2 workloads, run in this process) loads cleanly,
    with its heat maps and plots, and links each run's report page."""
    pytest.importorskip("memvisor_numa")
    (tmp_path / "sweep.toml").write_text(SWEEP)
    _register_commands()
    done = CliRunner().invoke(cli, ["sweep", str(tmp_path / "sweep.toml"), "--serial", "--quiet",
                                    "--out", str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    page, problems = browser(tmp_path / "out" / "index.html")
    _keep(page, "sweep-index")
    assert not problems + _images_and_plots(page) + page_problems(tmp_path / "out" / "index.html", dotted_names=True)
    assert page.locator("img").count() >= 2
    runs = page.eval_on_selector_all("#runs a", "links => links.map(a => a.href)")
    assert len(runs) == 4 and all(link.endswith("/report.html") for link in runs)
    run, more = browser(Path(runs[0].removeprefix("file://")))
    assert not more + _images_and_plots(run) and run.locator("#summary .card").count() >= 2
