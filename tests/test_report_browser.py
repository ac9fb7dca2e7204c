"""The report in a real headless Chromium: loads cleanly, every poster decodes, a click plays, numbers are right,
the settings every cell shares head the page, each cell names its row id, and a CPU run's timings say CPU·s.

Needs Debian's `chromium` (`apt-get install -y chromium`; `make test` installs it) and Playwright for Python
(the `test` extra); Playwright drives the system browser, nothing is downloaded. A missing browser fails the test.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from kandinsky_batch.config.load import load_config
from kandinsky_batch.job import run
from kandinsky_batch.output.report import write_report
from kandinsky_batch.output.storage import Storage
from tests.helpers import write_dataset
from tests.scores_output import METRICS, expected_scores, write_scores
from tests.sweep_output import expected_stats

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "report.png"
COLUMNS = ["model", "num_inference_steps"]  # the report's default for the tiny sweep: every axis but seed


@pytest.fixture(scope="module")
def sweep_output(tmp_path_factory, inprocess_module) -> str:
    """A real tiny sweep, `configs/tiny-sweep.yaml` (2 tiny models x 2 step counts x 3 seeds) over the demo's
    prompts plus a blank one (its cells are invalid and show their error); its output URI. Rendered without the
    config's fused scores: the scores tests write their own table, with known values."""
    root = tmp_path_factory.mktemp("sweep")
    rows = pq.read_table(ROOT / "jobs" / "sweep-prompts.parquet").to_pylist() + [{"id": "blank", "prompt": " "}]
    data = write_dataset(root / "prompts.parquet", rows)
    uri = f"file://{root / 'out'}"
    # At 32x32 (the config's 64x64 costs the suite 4x the render time for the same page).
    cfg = load_config(str(ROOT / "configs" / "tiny-sweep.yaml"), [f"input.path={data}", f"output.uri={uri}",
                                                                  "score.metrics=[]", "render.height=32",
                                                                  "render.width=32", "render.num_frames=9"])
    result = run(cfg, progress=False)
    assert (result.ok, result.invalid) == (48, 12)
    return uri


@pytest.fixture(scope="module")
def report(sweep_output) -> Path:
    return write_report(sweep_output)


@pytest.fixture(scope="module")
def scored_report(sweep_output, tmp_path_factory) -> tuple[Path, Path]:
    """The same sweep with a scores table of its ok rows (tests/scores_output.py): its report and output root."""
    root = tmp_path_factory.mktemp("scored") / "out"
    shutil.copytree(sweep_output.removeprefix("file://"), root, ignore=shutil.ignore_patterns("report"))
    write_scores(Storage(f"file://{root}"))
    return write_report(f"file://{root}"), root


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's Chromium with `apt-get install -y chromium` "
                    "(`make test` does it), then rerun", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is missing: `.venv/bin/pip install -e '.[test]'` "
                    "(or `pip install 'playwright>=1.60'`)", pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


class Loaded:
    """A page showing the report, with every console error, page error and failed request it produced."""

    def __init__(self, browser, report: Path) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.problems: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url} {r.failure}"))
        self.page.goto(report.as_uri(), wait_until="load")


@pytest.fixture(scope="module")
def loaded(browser, report):
    """One page for the tests that only read it (and hover): each load decodes every poster again."""
    page = Loaded(browser, report)
    yield page
    page.page.close()


@pytest.fixture
def fresh(browser, report):
    """A page of its own, for a test that plays videos (they would play on under the others) or saves the page."""
    page = Loaded(browser, report)
    yield page
    page.page.close()


@pytest.fixture(scope="module")
def scored(browser, scored_report):
    """One scored page: each test sets the metric, order and colouring it reads before reading them."""
    page = Loaded(browser, scored_report[0])
    yield page
    page.page.close()


@pytest.fixture
def fresh_scored(browser, scored_report):
    page = Loaded(browser, scored_report[0])
    yield page
    page.page.close()


def test_page_loads_cleanly_and_every_poster_decodes(loaded, sweep_output):
    page = loaded.page
    posters = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])")
    ok_cells = page.locator(".entry[data-status=ok]").count()
    assert ok_cells > 0 and len(posters) == ok_cells
    assert all(complete and width > 0 and height > 0 for complete, width, height in posters), posters
    assert page.locator("#tiny-notice").is_visible()
    assert loaded.problems == []


def test_clicking_a_poster_plays_its_video(fresh):
    page = fresh.page
    ids = page.eval_on_selector_all(".entry[data-status=ok]", "els => els.map(e => e.dataset.id)")
    for rid in (ids[0], ids[-1]):
        page.locator(f'.entry[data-id="{rid}"] button.poster').click()
        page.wait_for_function(
            """id => { const v = document.querySelector(`.entry[data-id="${id}"] video`);
                       return v && !v.paused && v.readyState >= 2 && v.currentTime > 0.3; }""",
            arg=rid, timeout=15_000)
        width = page.eval_on_selector(f'.entry[data-id="{rid}"] video', "v => v.videoWidth")
        assert width > 0
    # ▶ on a row plays all its cells together.
    row = page.locator("tr.grid-row").nth(1)
    row.locator("button.play-row").click()
    page.wait_for_function(
        """row => { const vs = [...document.querySelectorAll("tr.grid-row")[row].querySelectorAll("video")];
                    return vs.length > 0 && vs.every(v => !v.paused && v.currentTime > 0.3); }""",
        arg=1, timeout=15_000)
    assert row.locator("video").count() == row.locator(".entry[data-status=ok]").count()
    assert fresh.problems == []


def test_variant_table_equals_the_manifest(loaded, sweep_output):
    page = loaded.page
    cells = page.eval_on_selector_all(
        "#variant-table td[data-field]",
        "els => els.map(e => [e.dataset.variant, e.dataset.field, e.dataset.value, e.textContent.trim()])")
    shown: dict[str, dict] = {}
    for variant, field, value, text in cells:
        shown.setdefault(variant, {})[field] = (value, text)
    want = expected_stats(Path(sweep_output.removeprefix("file://")) / "manifest", COLUMNS)
    assert set(shown) == set(want)
    for variant, stats in want.items():
        for field, value in stats.items():
            got, text = shown[variant][field]
            if isinstance(value, str):
                assert got == text == value, (variant, field)
            elif field in ("ok", "failed", "invalid"):
                assert int(got) == int(text) == value, (variant, field)
            else:
                assert float(got) == pytest.approx(float(value), rel=1e-12), (variant, field)
                assert float(text) == pytest.approx(float(value), abs=0.0051 if value < 10 else 0.051), (variant, field)
    grid_cells = page.locator("td.cell").count()
    assert grid_cells == sum(s["ok"] + s["failed"] + s["invalid"] for s in want.values())
    assert loaded.problems == []


def test_the_header_shows_the_settings_every_cell_shares_once(loaded, sweep_output):
    page = loaded.page
    block = page.locator("#settings")
    assert block.is_visible()
    shown = dict(page.eval_on_selector_all(
        "#settings [data-setting]", "els => els.map(e => [e.dataset.setting, e.querySelector('dd').textContent])"))
    manifest = pq.read_table(Path(sweep_output.removeprefix("file://")) / "manifest")

    def distinct(column: str) -> list:
        return pc.unique(manifest[column].drop_null()).to_pylist()

    # The fixture renders every cell at 32x32, 9 frames, guidance 5.0, 8 fps, mp4, on this CPU host; the model,
    # the steps and the seed are its sweep's axes: they head the grid instead.
    assert distinct("height") == distinct("width") == [32] and distinct("num_frames") == [9]
    assert (shown["size"], shown["num_frames"], shown["guidance_scale"]) == ("32×32", "9", "5.0")
    assert (shown["fps"], shown["format"], shown["device"]) == ("8", "mp4", "CPU")
    assert not {"model", "num_inference_steps", "seed"} & set(shown)
    assert len(distinct("model")) == 2 and len(distinct("num_inference_steps")) == 2
    if "negative_prompt" in shown:
        assert distinct("negative_prompt") == [shown["negative_prompt"]]
    # Once: the grid's cells do not repeat them.
    assert page.locator("td.cell", has_text="32×32").count() == 0
    assert loaded.problems == []


def test_hovering_a_cell_names_its_row_id(loaded):
    page = loaded.page
    entries = page.eval_on_selector_all(".entry", "els => els.map(e => [e.dataset.id, e.dataset.status])")
    assert {status for _, status in entries} == {"ok", "invalid"}
    for rid, status in (entries[0], next(e for e in entries if e[1] == "invalid")):
        cell = page.locator("td.cell", has=page.locator(f'.entry[data-id="{rid}"]'))
        cell.hover()
        assert cell.get_attribute("title") == rid
        detail = cell.locator(".rid")
        assert detail.is_visible() and detail.inner_text() == rid, status
        # Whole, not clipped: ids of a sweep differ at their ends.
        assert detail.evaluate("e => e.scrollWidth <= e.clientWidth && e.scrollHeight <= e.clientHeight")
    assert loaded.problems == []


def test_a_cpu_run_reports_cpu_seconds_not_gpu_seconds(loaded):
    page = loaded.page
    header = page.locator("#variant-table th[data-unit]")
    assert header.inner_text() == "CPU·s / video"
    assert "GPU·s" not in page.locator("body").inner_text()
    assert loaded.problems == []


def _numbers(page, selector: str) -> list[dict]:
    return page.eval_on_selector_all(selector, """els => els.map(e => ({...e.dataset, text: e.innerText.trim(),
        row: e.closest("tr").dataset}))""")


def test_score_table_and_paired_comparisons_equal_the_scores_table(scored, scored_report):
    page, want = scored.page, expected_scores(scored_report[1], COLUMNS)
    assert page.locator("#scores").is_visible()
    cells = _numbers(page, "#score-table td.score")
    assert len(cells) == 4 * len(METRICS)
    for cell in cells:
        mean, low, high, n = want[cell["metric"]]["means"][cell["variant"]]
        assert (float(cell["value"]), float(cell["low"]), float(cell["high"])) == pytest.approx((mean, low, high),
                                                                                             rel=1e-12)
        assert int(cell["n"]) == n == 12  # every ok row of the variant: 4 prompts x 3 seeds
        assert cell["text"].split() == [f"{mean:.4g}", f"[{low:.4g},", f"{high:.4g}]"]
    rates = _numbers(page, "#pair-table td.rate")
    assert len(rates) == 6 * 2  # 4 variants: 6 pairs, of the two metrics with a direction
    for cell in rates:
        rate, low, high, n = want[cell["metric"]]["pairs"][cell["row"]["a"], cell["row"]["b"]]
        assert (float(cell["value"]), float(cell["low"]), float(cell["high"])) == pytest.approx((rate, low, high),
                                                                                             rel=1e-12)
        assert int(cell["n"]) == n == 12
        assert cell["text"].split() == [f"{100 * rate:.0f}", "%", f"[{100 * low:.0f},", f"{100 * high:.0f}]", "·",
                                        str(n)]
    assert scored.problems == []


def _order(page) -> list[list[str]]:
    return page.eval_on_selector_all("tr.grid-row", "trs => trs.map(tr => [tr.dataset.rowIndex, "
                                     "...[...tr.querySelectorAll('td.cell')].map(td => td.dataset.variant)])")


def test_sorting_by_a_metric_reorders_the_cells(scored, scored_report):
    page, want = scored.page, expected_scores(scored_report[1], COLUMNS)
    grid = _order(page)
    for metric, way in (("clip_score", -1), ("shot_cuts", 1), ("motion", -1)):
        page.select_option("#score-metric", metric)
        page.select_option("#score-order", "variants")
        means = want[metric]["means"]
        ranked = sorted(means, key=lambda k: (way * means[k][0], list(means).index(k)))
        assert all(row[1:] == ranked for row in _order(page)), metric
        header = page.eval_on_selector_all("#grid-table thead tr.flat th[data-variant]", "ths => ths.map(th => ["
                                           "th.dataset.variant, th.offsetParent !== null])")
        assert header == [[k, True] for k in ranked]
        assert page.locator("#grid-table thead tr.axes").first.is_hidden()
        page.select_option("#score-order", "prompts")
        prompts = want[metric]["prompts"]
        ranked = sorted(prompts, key=lambda i: way * prompts[i])
        seen = [int(row[0]) for row in _order(page)]
        assert list(dict.fromkeys(seen)) == ranked + [i for i in dict.fromkeys(seen) if i not in prompts]
    page.select_option("#score-order", "grid")
    assert _order(page) == grid and page.locator("#grid-table thead tr.axes").first.is_visible()
    assert scored.problems == []


def test_cells_are_coloured_and_the_best_variant_of_each_prompt_is_marked(scored, scored_report):
    page, want = scored.page, expected_scores(scored_report[1], COLUMNS)
    for metric in ("clip_score", "shot_cuts"):
        page.select_option("#score-metric", metric)
        marked = page.eval_on_selector_all("td.cell", """tds => tds.filter(td => td.querySelector('.star')
            && td.querySelector('.star').offsetParent !== null).map(td => [td.closest('tr').dataset.rowIndex,
            td.dataset.variant])""")
        rows_of = {}
        for index, variant in marked:
            rows_of.setdefault(int(index), set()).add(variant)
        assert rows_of == want[metric]["best"], metric
        # The best mark is on every seed's cell of the prompt's best variant: 3 seeds.
        assert len(marked) == 3 * sum(len(v) for v in want[metric]["best"].values())
        colours = page.eval_on_selector_all("td.cell", """(tds, m) => tds.map(td => {
            const span = td.querySelector(`.score-of [data-m="${m}"]`);
            return [span && span.dataset.value ? Number(span.dataset.value) : null,
                    getComputedStyle(td).backgroundColor]; })""", metric)
        scored_cells = [(v, c) for v, c in colours if v is not None]
        good, bad = (max, min) if metric == "clip_score" else (min, max)
        rgb = {name: [int(x) for x in c[c.index("(") + 1:-1].split(",")[:3]]
               for name, (v, c) in (("good", good(scored_cells)), ("bad", bad(scored_cells)))}
        assert rgb["good"][1] > rgb["good"][0] and rgb["bad"][0] > rgb["bad"][1], (metric, rgb)  # green, red
    page.uncheck("#score-colour")
    assert set(page.eval_on_selector_all("td.cell", "tds => tds.map(td => td.style.background)")) == {""}
    page.check("#score-colour")  # as the page loads, for the tests sharing it
    assert scored.problems == []


def _save(page, shot: Path, docs: bool) -> None:
    from PIL import Image

    page.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as image:
        assert image.width == 1280 and image.height > 900
        assert max(hi - lo for lo, hi in image.convert("RGB").getextrema()) > 128  # not a blank page
        if docs and (not SCREENSHOT.exists() or os.environ.get("KB_UPDATE_SCREENSHOT") == "1"):
            # 256 colours keep the README's image a quarter of the size, text still crisp.
            SCREENSHOT.parent.mkdir(exist_ok=True)
            image.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(SCREENSHOT, optimize=True)


def test_screenshot(fresh, fresh_scored, tmp_path):
    """Full-page screenshots with and without scores; the scored one replaces docs/report.png (shown in
    docs/operations.md) when that is missing or KB_UPDATE_SCREENSHOT=1."""
    _save(fresh.page, tmp_path / "report.png", docs=False)
    _save(fresh_scored.page, tmp_path / "scored.png", docs=True)
    assert fresh.problems == [] and fresh_scored.problems == []
