"""fnattr.report in a real browser: Debian's Chromium driven by Playwright for Python, axe-core
from npm for the accessibility check. Every test here skips, with one line that says how to
install what is missing, where the browser cannot be had (`make test` installs it as root)."""

import io
import os
import pathlib
import shutil
import sys

import pytest
import torch

import fnattr.report
from fnattr.report import build
from fnattr import views
from tests.test_report import HOSTILE_SRC, HOSTILE_TGT, embedded, result, write_run
from tests.test_report import evaluation  # noqa: F401 - the module fixture, shared

DATA = pathlib.Path(__file__).parent / "data"
ROOT = pathlib.Path(__file__).parent.parent
SCREENSHOT = DATA / "report-result.png"
HOW = "`make test` installs both as root; by hand: apt-get install chromium; pip install playwright"


def _chromium() -> str | None:
    for path in (os.environ.get("FNATTR_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if path and os.path.exists(path):
            return path
    return None


def _axe() -> pathlib.Path | None:
    for base in (os.environ.get("FNATTR_AXE_DIR"), ROOT / ".venv" / "axe", pathlib.Path(sys.prefix) / "axe"):
        if base and (path := pathlib.Path(base) / "node_modules" / "axe-core" / "axe.min.js").is_file():
            return path
    return None


try:  # without them the whole module skips, on one line
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.skip(f"browser tests: Playwright for Python is not installed ({HOW})", allow_module_level=True)
if _chromium() is None:
    pytest.skip(f"browser tests: no Chromium found ({HOW})", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    path = _chromium()
    try:  # a driver or a browser that cannot start: skip, and say why
        driver = sync_playwright().start()
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"browser tests: Playwright did not start ({str(error).splitlines()[0]}; {HOW})")
    try:
        b = driver.chromium.launch(executable_path=path, args=["--no-sandbox", "--font-render-hinting=none"])
    except Exception as error:  # noqa: BLE001
        driver.stop()
        pytest.skip(f"browser tests: Chromium at {path} did not start ({str(error).splitlines()[0]})")
    yield b
    b.close()
    driver.stop()


class Page:
    """A report opened from file://, recording console messages, errors and requests."""

    def __init__(self, browser, path: pathlib.Path, **options):
        self.context = browser.new_context(viewport={"width": 1000, "height": 760}, device_scale_factor=1,
                                           **options)
        self.page = self.context.new_page()
        self.console, self.requests = [], []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.route("**/*", lambda route: route.abort() if not route.request.url.startswith("file:")
                        else route.continue_())
        self.url = path.resolve().as_uri()
        self.page.goto(self.url)
        self.page.wait_for_selector("body[data-ready]")

    def close(self):
        errors = [m for m in self.console if m.startswith(("error", "pageerror", "warning"))]
        others = [u for u in self.requests if u != self.url]
        self.context.close()
        assert not errors, errors
        assert not others, f"the page made requests: {others}"

    def axe(self):
        self.page.add_script_tag(content=_axe().read_text(encoding="utf-8"))
        found = self.page.evaluate("async () => (await axe.run(document)).violations.map("
                                   "v => [v.id, v.impact, v.help, v.nodes.length, v.nodes[0].html])")
        assert not found, found


def rgb(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.removeprefix("rgb(").removesuffix(")").split(","))


def colours(page, selector: str) -> list[tuple[str, str, str]]:
    return page.eval_on_selector_all(selector, "els => els.map(e => [getComputedStyle(e)."
                                     "backgroundColor, getComputedStyle(e).color, e.title])")


@pytest.fixture(scope="module")
def result_page(tmp_path_factory):
    out = result(4, 4, seed=3, src_tokens=("The", " capital", " of", " France"),
                 tgt_tokens=(" Paris", ".", " It", " is"),
                 delta=torch.tensor([[0.0, 0.9, 0.0, 0.0]], dtype=torch.float64))
    path = tmp_path_factory.mktemp("report") / "result.html"
    fnattr.report.write(out, path, title="fnattr report: a test result")
    return out, path


def test_hovering_a_step_colours_the_source_by_its_scores(browser, result_page):
    out, path = result_page
    p = build.panel(out, 0)
    page = Page(browser, path)
    for k in (0, 2, 3):
        page.page.hover(f'button.step[data-col="{k}"]')
        shown = colours(page.page, ".panel .src .tok")
        assert len(shown) == 4
        for i, (bg, ink, title) in enumerate(shown):
            value = p["values"][k][i]
            want = build.colour(value, p["vmax"], signed=p["signed"])
            assert max(abs(a - b) for a, b in zip(rgb(bg), want)) <= 1, (k, i, bg, want)
            assert rgb(ink) == rgb("rgb(0,0,0)" if build.ink(want) == "#000000" else "rgb(255,255,255)")
            assert float(title.rsplit(": ", 1)[1]) == pytest.approx(value, rel=1e-5)  # score on hover
        # earlier generated tokens carry the target-side scores; later ones are not seen
        gens = colours(page.page, ".panel .gen .tok")
        for j, (bg, _, title) in enumerate(gens):
            if j < k:
                want = build.colour(p["values"][k][4 + j], p["vmax"], signed=p["signed"])
                assert max(abs(a - b) for a, b in zip(rgb(bg), want)) <= 1
    page.page.mouse.move(0, 0)
    status = page.page.text_content(".status")
    assert status.startswith("generated token 1 of 4 (step 0):  Paris; probability")
    page.close()


def test_arrow_keys_and_clicks_move_between_steps(browser, result_page):
    _, path = result_page
    page = Page(browser, path)
    pressed = lambda: page.page.eval_on_selector_all(  # noqa: E731
        'button.step[aria-pressed="true"]', "els => els.map(e => e.dataset.col)")
    assert pressed() == ["0"]
    page.page.keyboard.press("ArrowRight")
    page.page.keyboard.press("ArrowRight")
    assert pressed() == ["2"] and page.page.text_content(".status").startswith("generated token 3 of 4")
    page.page.keyboard.press("ArrowLeft")
    assert pressed() == ["1"]
    assert "\u26a0" in page.page.text_content(".status")  # step 2 did not converge: flagged
    page.page.keyboard.press("End")
    assert pressed() == ["3"]
    page.page.keyboard.press("ArrowRight")  # stays on the last step
    assert pressed() == ["3"]
    page.page.click('button.step[data-col="0"]')
    assert pressed() == ["0"]
    page.close()


def test_heatmap_toggles(browser, result_page):
    out, path = result_page
    page = Page(browser, path)
    toggle = page.page.locator("button.toggle")
    assert toggle.get_attribute("aria-expanded") == "false"
    toggle.click()
    assert toggle.get_attribute("aria-expanded") == "true"
    cells = page.page.eval_on_selector_all(".heat tbody tr:not(.scorerow) td", "els => els.map(e => e.title)")
    hm = build.panel(out, 0)
    assert len(cells) == len(hm["rows"]) * len(hm["cols"])
    assert sum(c == "not visible to this step" for c in cells) == sum(v is None for col in hm["values"] for v in col)
    page.close()


def test_hostile_tokens_are_shown_as_text(browser, tmp_path):
    meta = {"method": "</script><b>m</b>", "target_fn": "probability", "baseline": "<i>x</i> <!--"}
    out = result(4, 4, src_tokens=HOSTILE_SRC, tgt_tokens=HOSTILE_TGT, meta=meta)
    path = fnattr.report.write(out, tmp_path / "hostile.html")
    page = Page(browser, path)
    texts = page.page.eval_on_selector_all(".panel .tok", "els => els.map(e => e.textContent)")
    assert texts == [views.visible(t) for t in (*HOSTILE_SRC, *HOSTILE_TGT)]
    bidi = page.page.eval_on_selector_all(".panel .tok", "els => els.map(e => getComputedStyle(e).unicodeBidi)")
    assert set(bidi) == {"isolate"}  # the right-to-left override reorders its own token only
    assert page.page.evaluate("document.querySelectorAll('script').length") == 2
    assert page.page.evaluate("document.querySelectorAll('#app b, #app i').length") == 0
    assert "baseline: <i>x</i> <!--" in page.page.text_content(".caption")
    page.close()


def test_dataset_list_filters_sorts_opens_rows_and_opens_fast(browser, tmp_path):
    folder = write_run(tmp_path / "run", 1000, shard_size=100)
    path = fnattr.report.write(folder, tmp_path / "run.html")
    data = embedded(path.read_text(encoding="utf-8"))
    page = Page(browser, path)
    ready = page.page.evaluate("window.fnattrReadyAt")
    assert ready < 2000, f"the 1,000-row report took {ready:.0f} ms to open"
    assert page.page.text_content("#count") == "1000 of 1000 rows, first 100 shown"
    page.page.fill("#search", "ex-99")
    ids = page.page.eval_on_selector_all("#rowsbody tr td:nth-child(2)", "els => els.map(e => e.textContent)")
    assert sorted(ids) == sorted(["ex-99", *(f"ex-{i}" for i in range(990, 1000))])
    page.page.fill("#search", "")
    page.page.click('th[data-sort="top"] button')  # largest |score| first
    first = page.page.text_content("#rowsbody tr td:nth-child(2)")
    best = max(data["index"], key=lambda e: (e["topScore"], -e["n"]))
    assert first == best["id"]
    assert page.page.get_attribute('th[data-sort="top"]', "aria-sort") == "descending"
    page.page.fill("#search", "ex-512")
    page.page.click('#rowsbody tr[data-i="512"] button.open')
    page.page.wait_for_selector('body[data-example="512"]')
    assert page.page.text_content("#detailh") == "example 512, id ex-512"
    assert page.page.text_content(".panel .src .tok") == " w512"
    page.page.keyboard.press("ArrowRight")  # the opened example has the keys
    assert page.page.get_attribute('button.step[data-col="1"]', "aria-pressed") == "true"
    page.page.hover('button.step[data-col="1"]')
    p = data["details"][512]["panels"][0]
    bg = colours(page.page, ".panel .src .tok")[2][0]
    assert max(abs(a - b) for a, b in zip(rgb(bg), build.colour(p["values"][1][2], p["vmax"], signed=True))) <= 1
    page.close()


def test_comparison_side_by_side(browser, tmp_path):
    a = result(3, 3, batch=2, seed=1)
    b = result(3, 3, batch=2, seed=2, meta={"method": "saliency", "target_fn": "probability"})
    path = fnattr.report.write([a, b], tmp_path / "cmp.html")
    page = Page(browser, path)
    assert page.page.eval_on_selector_all(".panel h3", "els => els.map(e => e.textContent)") == [
        "integrated_gradients", "saliency"]
    page.page.keyboard.press("ArrowRight")  # both panels follow the step
    assert page.page.eval_on_selector_all('button.step[aria-pressed="true"]', "els => els.map(e => e.dataset.col)") == ["1", "1"]
    assert page.page.locator("svg.plot").count() == 2
    page.close()


def test_evaluate_report_draws_faithfulness(browser, evaluation, tmp_path):
    folder, comp, files = evaluation
    path = fnattr.report.write([str(folder), *files], tmp_path / "eval.html")
    page = Page(browser, path)
    rows = page.page.eval_on_selector_all(".faith table tbody th", "els => els.map(e => e.textContent)")
    assert rows == list(comp.methods)
    assert page.page.locator(".faith svg.plot").count() == 2  # deletion, insertion (the panels plot the score)
    assert page.page.locator(".overall table tbody tr").count() == len(comp.methods)
    page.close()
    alone = Page(browser, fnattr.report.write(str(folder), tmp_path / "alone.html"))
    assert alone.page.locator(".panel").count() == 0  # an evaluate folder stores no attributions
    assert alone.page.locator(".faith svg.plot").count() == 3  # ... so it plots the score itself
    alone.close()


def test_screenshot_matches_the_stored_one(browser, result_page):
    from PIL import Image
    import numpy as np

    _, path = result_page
    page = Page(browser, path)
    page.page.hover('button.step[data-col="2"]')
    png = page.page.screenshot(full_page=False)
    page.close()
    got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    if os.environ.get("FNATTR_UPDATE_SCREENSHOTS") or not SCREENSHOT.exists():
        SCREENSHOT.parent.mkdir(exist_ok=True)
        Image.open(io.BytesIO(png)).save(SCREENSHOT)
        if not os.environ.get("FNATTR_UPDATE_SCREENSHOTS"):
            pytest.fail(f"no stored screenshot: wrote {SCREENSHOT}; check it and commit it")
    want = np.asarray(Image.open(SCREENSHOT).convert("RGB"), dtype=np.int16)
    assert got.shape == want.shape
    differ = (np.abs(got - want).max(-1) > 40).mean()
    assert differ < 0.02, f"{differ:.1%} of the pixels differ from {SCREENSHOT.name}"


def test_pages_pass_the_axe_core_accessibility_check(browser, result_page, evaluation, tmp_path):
    if _axe() is None:
        pytest.skip("axe-core is not installed: `make test` fetches it (npm install --prefix "
                    ".venv/axe axe-core@4.11.0)")
    _, path = result_page
    page = Page(browser, path)
    page.page.click("button.toggle")  # with the heatmap open
    page.page.hover('button.step[data-col="1"]')
    page.axe()
    page.close()
    folder, _, files = evaluation
    for inputs in (write_run(tmp_path / "run", 30, shard_size=8), [str(folder), *files]):
        page = Page(browser, fnattr.report.write(inputs, tmp_path / "page.html"))
        page.page.click('#rowsbody tr[data-i="1"] button.open')
        page.page.wait_for_selector('body[data-example="1"]')
        page.axe()
        page.close()
