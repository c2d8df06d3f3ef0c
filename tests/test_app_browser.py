"""The app in a real browser: `python -m enat_diffusers.app` on a free localhost port, driven in headless Chromium
(Debian's `chromium` package) through Playwright's Python API. Skips, with the reason, where either is missing.

Set ENAT_UPDATE_SCREENSHOT=1 to write the screenshot of the README and the app guide (assets/enat_app.png) instead of a temporary file.
"""

import os
import shutil
from pathlib import Path

import pytest

from .app_server import running_app

REPO = Path(__file__).resolve().parents[1]
README_SCREENSHOT = REPO / "assets" / "enat_app.png"
# Without the networking flags Chromium keeps trying to reach Google's services, which a closed machine refuses.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GENERATION_TIMEOUT_MS = 120_000
DEFAULT_STEPS = 8  # the digits demo's default_num_inference_steps

pytest.importorskip("gradio", reason="the app needs the app extra: pip install -e '.[app]'")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs Playwright's Python package: pip install playwright"
)


@pytest.fixture(scope="module")
def chromium_executable() -> str:
    """Checked before the app is started, so that a machine without a browser skips at once."""
    path = os.environ.get("ENAT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path or not os.access(path, os.X_OK):
        pytest.skip(f"no Chromium executable ({path or 'chromium not on PATH'}): install Debian's chromium package")
    return path


@pytest.fixture(scope="module")
def app_url(chromium_executable, tmp_path_factory):
    """Starts the app as a user does, with the digits demo on one thread, and stops it afterwards."""
    with running_app(tmp_path_factory.mktemp("app")) as (url, _, _):
        yield url


@pytest.fixture
def page(chromium_executable, tmp_path):
    executable = chromium_executable
    with sync_api.sync_playwright() as playwright:
        try:
            context = playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),
                executable_path=executable,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 900},
            )
        except sync_api.Error as error:
            pytest.skip(f"Chromium at {executable} could not be started: {str(error).splitlines()[0]}")
        try:
            yield context.new_page()
        finally:
            context.close()


def pick_class(page, name: str) -> None:
    """Replaces the page's default class by `name`."""
    combobox = page.get_by_role("combobox", name="Class")
    combobox.click()
    combobox.press("Backspace")  # removes the default class
    page.get_by_role("option", name=name).click()


def gallery_images(page, gallery_id: str):
    return page.locator(f"#{gallery_id} .grid-container img")


def test_generate_in_the_browser_shows_images_and_one_step_frame_per_step(app_url, page, tmp_path):
    page.goto(app_url)
    page.wait_for_selector("#enat-generate")
    pick_class(page, "seven (7)")
    page.get_by_role("spinbutton", name="number input for Images per class").fill("4")
    page.get_by_role("spinbutton", name="number input for Images per class").press("Enter")
    page.click("#enat-generate")

    images = gallery_images(page, "enat-gallery")
    sync_api.expect(images).to_have_count(4, timeout=GENERATION_TIMEOUT_MS)
    frames = gallery_images(page, "enat-steps")
    sync_api.expect(frames).to_have_count(DEFAULT_STEPS, timeout=GENERATION_TIMEOUT_MS)
    # The pictures load: 16x16 digits enlarged (nearest neighbour) to 256x256.
    page.wait_for_function(
        """() => [...document.querySelectorAll('#enat-gallery .grid-container img')]
            .every(image => image.complete && image.naturalWidth === 256)""",
        timeout=30_000,
    )
    # Each image is served as a PNG (the gallery's download button saves that file).
    assert all(source.endswith(".png") for source in images.evaluate_all("images => images.map(i => i.src)"))
    assert [images.nth(i).get_attribute("alt") for i in range(4)] == [f"seven · seed {seed}" for seed in range(4)]
    captions = [frames.nth(i).get_attribute("alt") for i in range(DEFAULT_STEPS)]
    assert [caption.split(":")[0] for caption in captions] == [f"step {k}/{DEFAULT_STEPS}" for k in range(1, 9)]
    assert captions[-1].endswith(" 0 masked")
    sync_api.expect(page.locator("#enat-status")).to_contain_text("4 image(s), 8 steps each.")

    screenshot = README_SCREENSHOT if os.environ.get("ENAT_UPDATE_SCREENSHOT") == "1" else tmp_path / "app.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes().startswith(b"\x89PNG")

    # Clicking the third image shows its own steps.
    images.nth(2).click()
    sync_api.expect(page.locator("#enat-steps")).to_contain_text("Step by step: image 3", timeout=30_000)


def test_the_first_click_on_generate_draws_the_default_class(app_url, page):
    page.goto(app_url)
    page.wait_for_selector("#enat-generate")
    page.click("#enat-generate")
    images = gallery_images(page, "enat-gallery")
    sync_api.expect(images).to_have_count(1, timeout=GENERATION_TIMEOUT_MS)
    assert images.first.get_attribute("alt") == "zero · seed 0"


def test_a_bad_request_shows_a_message_in_the_page_and_the_app_keeps_serving(app_url, page):
    page.goto(app_url)
    page.wait_for_selector("#enat-generate")
    seed = page.get_by_role("spinbutton", name="Seed")
    page.click("#enat-random-seed")
    sync_api.expect(seed).not_to_have_value("0")

    combobox = page.get_by_role("combobox", name="Class")
    combobox.fill("sevn")
    combobox.press("Enter")
    page.click("#enat-generate")
    message = page.get_by_test_id("toast-text")
    sync_api.expect(message).to_contain_text("Class: unknown class name 'sevn'. Did you mean 'seven'", timeout=60_000)
    assert "Traceback" not in page.content()

    page.reload()
    page.wait_for_selector("#enat-generate")
    pick_class(page, "three (3)")
    page.click("#enat-generate")
    images = gallery_images(page, "enat-gallery")
    sync_api.expect(images).to_have_count(1, timeout=GENERATION_TIMEOUT_MS)
    assert images.first.get_attribute("alt") == "three · seed 0"


def test_two_tabs_generating_at_once_get_the_images_each_gets_alone(app_url, page):
    tabs = [page, page.context.new_page()]
    for tab, seed in zip(tabs, ("10", "20"), strict=True):
        tab.goto(app_url)
        tab.wait_for_selector("#enat-generate")
        pick_class(tab, "seven (7)")
        tab.get_by_role("spinbutton", name="number input for Images per class").fill("2")
        tab.get_by_role("spinbutton", name="number input for Images per class").press("Enter")
        tab.get_by_role("spinbutton", name="Seed").fill(seed)
    for tab in tabs:
        tab.click("#enat-generate")

    def sources(tab, first_caption: str) -> list[str]:
        images = gallery_images(tab, "enat-gallery")
        sync_api.expect(images.first).to_have_attribute("alt", first_caption, timeout=GENERATION_TIMEOUT_MS)
        sync_api.expect(images).to_have_count(2)
        # Each request's images are files of their own (their names differ): compare what the browser receives.
        addresses = images.evaluate_all("images => images.map(image => image.src)")
        return [tab.request.get(address).body() for address in addresses]

    together = [sources(tabs[0], "seven · seed 10"), sources(tabs[1], "seven · seed 20")]
    assert together[0] != together[1]
    tabs[0].get_by_role("spinbutton", name="Seed").fill("20")
    tabs[0].click("#enat-generate")
    assert sources(tabs[0], "seven · seed 20") == together[1]


def test_edit_tab_inpaints_a_drawn_sample_in_the_browser(app_url, page):
    page.goto(app_url)
    page.wait_for_selector("#enat-generate")
    page.get_by_role("tab", name="Edit").click()
    page.click("#enat-edit")  # nothing to edit yet: a message, and the page keeps working
    message = page.get_by_test_id("toast-text")
    sync_api.expect(message).to_contain_text("Image: upload an image to edit, or draw a sample.", timeout=60_000)
    page.click("#enat-edit-sample")  # a zero (the first class) with its bottom half painted
    # Editing before the sample has arrived would send an empty editor.
    sync_api.expect(page.locator("#enat-edit-status")).to_contain_text(
        "Sample drawn (zero · seed 0)", timeout=GENERATION_TIMEOUT_MS
    )
    page.click("#enat-edit")

    results = gallery_images(page, "enat-edit-gallery")
    sync_api.expect(results).to_have_count(4, timeout=GENERATION_TIMEOUT_MS)
    assert [results.nth(i).get_attribute("alt") for i in range(4)] == [f"zero · seed {seed}" for seed in range(4)]
    inputs = gallery_images(page, "enat-edit-inputs")
    sync_api.expect(inputs).to_have_count(2)
    assert [inputs.nth(i).get_attribute("alt") for i in range(2)] == ["input", "mask (white: regenerated)"]
    sync_api.expect(page.locator("#enat-edit-status")).to_contain_text("inpaint: 4 image(s).")
    assert "Traceback" not in page.content()
