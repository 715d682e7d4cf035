"""The playground page at `/`, driven in a real headless Chromium (Debian's `chromium` and
`chromium-driver`, installed by `scripts/dev setup`; skipped, saying so, where they are not).

The session's server has API keys configured, so the page first asks for one; with a wrong
key it says so in plain words, with the right one it lists the models and generates: two
inline (b64_json) images with their seeds and revised prompts, then one image by URL. The
screenshot is kept as a test artifact (its path is printed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.integration.conftest import API_KEY, ROOT

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = ROOT / "benchmarks" / "results"  # git-ignored


@pytest.fixture
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("chromium/chromedriver not installed: scripts/dev setup installs Debian's "
                    "`chromium` and `chromium-driver` when run as root with apt-get")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,1100"]:
        options.add_argument(arg)
    # The Debian driver, explicitly: Selenium Manager would try to download one.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout_s: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(condition)


def _status(driver) -> str:
    return driver.find_element("id", "status").text


def _shown_images(driver) -> list[dict]:
    """Each result figure: whether its image decoded (naturalWidth > 0) and its caption."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#results figure')].map(f => ({
          width: f.querySelector('img').naturalWidth, complete: f.querySelector('img').complete,
          src: f.querySelector('img').src.slice(0, 40), seed: f.querySelector('.seed').textContent,
          prompt: f.querySelector('.prompt').textContent}));""")


def _generate(driver, **fields) -> None:
    from selenium.webdriver.support.ui import Select

    for field, value in fields.items():
        element = driver.find_element("id", field)
        if element.tag_name == "select":
            Select(element).select_by_value(str(value))
        else:
            element.clear()
            element.send_keys(str(value))
    driver.find_element("id", "generate").click()


def test_playground_generates_and_shows_images(server, browser, tmp_path):
    browser.get(server.base_url + "/")
    # Keys are configured: the page loads without one and asks for it.
    _wait(browser, lambda d: d.find_element("id", "key-box").is_displayed(), 30)
    assert "needs an API key" in _status(browser)

    browser.find_element("id", "api-key").send_keys("not-a-key")
    browser.find_element("id", "use-key").click()
    _wait(browser, lambda d: "not accepted" in _status(d), 30)

    browser.find_element("id", "api-key").clear()
    browser.find_element("id", "api-key").send_keys(API_KEY)
    browser.find_element("id", "use-key").click()
    _wait(browser, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#model option')].map(o => o.value)").count("tiny-sd") == 1, 30)
    assert browser.execute_script("return sessionStorage.getItem('artserve-api-key')") == API_KEY
    assert browser.execute_script("return localStorage.length") == 0

    # A bad request is explained, not dumped: a size the model does not accept.
    prompt = "a lighthouse on a cliff at sunset"
    _generate(browser, model="tiny-sd", prompt=prompt, n=1, seed=7, quality="low", format="b64_json")
    _wait(browser, lambda d: "1 image from tiny-sd in" in _status(d))
    # One inline image is streamed: previews took the figure's place before the image did.
    shown = _wait(browser, lambda d: (imgs := _shown_images(d)) and all(i["complete"] for i in imgs) and imgs)
    assert len(shown) == 1 and shown[0]["seed"] == "seed 7" and shown[0]["width"] == 256, shown
    assert browser.execute_script("return document.querySelector('#results figure').dataset.previews") == "3"
    browser.execute_script("document.getElementById('size').add(new Option('100x100', '100x100'))")
    _generate(browser, size="100x100")
    _wait(browser, lambda d: "could not use these settings" in _status(d))
    assert "100x100" in _status(browser) and "{" not in _status(browser)

    # Two inline images with their seeds and revised prompts.
    _generate(browser, size="256x256", n=2, seed=1234, style="natural")
    _wait(browser, lambda d: "2 images from tiny-sd in" in _status(d))
    shown = _wait(browser, lambda d: (imgs := _shown_images(d)) and all(i["complete"] for i in imgs) and imgs)
    assert [i["seed"] for i in shown] == ["seed 1234", "seed 1235"]
    assert all(i["width"] == 256 for i in shown), shown
    assert all(i["src"].startswith("data:image/webp;base64,") for i in shown)
    assert all(prompt in i["prompt"] and i["prompt"] != prompt for i in shown)  # the style preset's rewrite

    screenshot = tmp_path / "playground.png"
    browser.save_screenshot(str(screenshot))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshot, ARTIFACTS / "playground.png")
    print(f"\nplayground screenshot: {screenshot} (copy: {ARTIFACTS / 'playground.png'})")
    assert Path(screenshot).stat().st_size > 10_000

    # One image by signed URL, from the other model.
    _generate(browser, model="tiny-flux", n=1, seed=99, format="url")
    _wait(browser, lambda d: "1 image from tiny-flux in" in _status(d))
    shown = _wait(browser, lambda d: (imgs := _shown_images(d)) and all(i["complete"] for i in imgs) and imgs)
    assert shown[0]["width"] > 0 and shown[0]["seed"] == "seed 99"
    assert shown[0]["src"].startswith(server.base_url + "/")


def _sign_in(driver, base_url: str) -> None:
    driver.get(base_url + "/")
    _wait(driver, lambda d: d.find_element("id", "key-box").is_displayed(), 30)
    driver.find_element("id", "api-key").send_keys(API_KEY)
    driver.find_element("id", "use-key").click()
    _wait(driver, lambda d: "tiny-sd" in d.execute_script(
        "return [...document.querySelectorAll('#edit-model option')].map(o => o.value)"), 30)


def _data_url_image(url: str):
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_playground_edits_with_a_painted_mask_and_makes_variations(server, browser, tmp_path):
    """Upload, paint a mask with the brush, edit with streamed previews: the kept (unpainted)
    region comes back as the uploaded pixels; then Variations on the result."""
    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    x = np.linspace(0, 255, 256, dtype=np.uint8)[None, :].repeat(256, 0)
    original = np.stack([x, x.T, np.full_like(x, 90)], axis=-1)
    upload = tmp_path / "photo.png"
    Image.fromarray(original, "RGB").save(upload)

    _sign_in(browser, server.base_url)
    browser.find_element("id", "tab-edit").click()
    assert browser.find_element("id", "edit-tab").is_displayed()
    assert not browser.find_element("id", "generate-tab").is_displayed()
    browser.find_element("id", "edit-image").send_keys(str(upload))
    _wait(browser, lambda d: d.execute_script("return document.getElementById('mask-canvas').width") == 256, 30)

    # Paint the left part with a 48-pixel brush: zig-zag strokes down the canvas.
    canvas = browser.find_element("id", "mask-canvas")
    browser.find_element("id", "brush").clear()
    browser.find_element("id", "brush").send_keys("48")
    width, height = canvas.rect["width"], canvas.rect["height"]
    scale = width / 256  # CSS pixels per image pixel
    strokes = ActionChains(browser).move_to_element_with_offset(canvas, int(-width / 2 + 20 * scale),
                                                                 int(-height / 2 + 10 * scale)).click_and_hold()
    for row in range(8):
        strokes.move_by_offset(int((60 if row % 2 == 0 else -60) * scale), int(30 * scale))
    strokes.release().perform()
    painted = np.asarray(_data_url_image(browser.execute_script(
        "return document.getElementById('mask-canvas').toDataURL('image/png')")).getchannel("A"))
    repaint = painted == 255  # what the page cuts out of the mask (alpha 0: repainted)
    assert 0.1 < repaint.mean() < 0.6, repaint.mean()
    assert "repainted" in browser.find_element("id", "mask-note").text

    Select(browser.find_element("id", "edit-model")).select_by_value("tiny-sd")
    Select(browser.find_element("id", "edit-quality")).select_by_value("low")
    browser.find_element("id", "edit-seed").send_keys("5")
    browser.find_element("id", "edit-submit").click()
    _wait(browser, lambda d: "1 image from tiny-sd in" in _status(d))
    assert browser.execute_script("return document.querySelector('#results figure').dataset.previews") == "3"
    shown = _wait(browser, lambda d: (imgs := _shown_images(d)) and all(i["complete"] for i in imgs) and imgs)
    assert len(shown) == 1 and shown[0]["width"] == 256 and shown[0]["seed"] == "seed 5", shown
    result = np.asarray(_data_url_image(browser.execute_script(
        "return document.querySelector('#results figure img').src")).convert("RGB"), dtype=np.int16)
    kept = ~repaint
    assert np.abs(result[kept] - original[kept]).max() <= 1  # the unpainted pixels, as uploaded
    assert np.abs(result[repaint] - original[repaint]).mean() > 10  # the painted ones, repainted
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "playground-edit.png"))

    # Variations of the shown image.
    browser.find_element("css selector", "#results figure button.variations").click()
    _wait(browser, lambda d: "2 variations from tiny-sd in" in _status(d))
    shown = _wait(browser, lambda d: (imgs := _shown_images(d)) and all(i["complete"] for i in imgs) and imgs)
    assert [i["width"] for i in shown] == [256, 256], shown
    # "Edit this" takes a shown image to the Edit tab.
    browser.find_element("id", "tab-generate").click()
    browser.find_element("css selector", "#results figure button.edit-this").click()
    _wait(browser, lambda d: d.find_element("id", "edit-tab").is_displayed()
          and d.execute_script("return document.getElementById('edit-source').naturalWidth") == 256, 30)
