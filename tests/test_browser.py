"""The web page in a real browser: `vitlab serve` runs as a user starts it (a subprocess on a free loopback port),
headless Chromium from the system's packages loads the page, uploads a digit, and the test reads the predicted
classes and waits for the rollout overlay, at desktop and at phone width. Screenshots are written into the test's
temporary directory, or into $VITLAB_SCREENSHOTS when it is set (to look at them).

`make test` installs Debian's chromium and chromium-driver when they are missing (as root); this test skips, with
that reason, only on a machine where they are not installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="no Chromium: install Debian's chromium and chromium-driver (`make test` does so when run as root)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(checkpoint: Path, log: Path, api_key: str | None = None) -> Iterator[str]:
    """`vitlab serve` in a subprocess on a free loopback port (the default host), until the block ends."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), *sys.path])}
    env.pop("VITLAB_API_KEY", None)
    if api_key:
        env["VITLAB_API_KEY"] = api_key
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vitlab", "serve", str(checkpoint), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"vitlab serve did not start:\n{log.read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(digits_checkpoint, tmp_path_factory):
    with _serve(digits_checkpoint, tmp_path_factory.mktemp("server") / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def digit(tmp_path_factory) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images[0] * 16).clip(0, 255).astype("uint8")  # a zero, 8 x 8, 0..16 -> 0..255
    path = tmp_path_factory.mktemp("img") / "zero.png"
    Image.fromarray(pixels, mode="L").resize((112, 112), Image.Resampling.NEAREST).save(path)
    return path


def _shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("VITLAB_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("width", [1200, 390], ids=["desktop", "phone"])
def test_upload_shows_the_prediction_and_the_overlay(server, browser, digit, tmp_path, width) -> None:
    browser.set_window_size(width, 900)
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "vit_tiny_patch7_28" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys(str(digit))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#predictions li")) == 5)
    rows = browser.find_elements(By.CSS_SELECTOR, "#predictions li")
    classes = [r.get_attribute("data-class") for r in rows]
    probs = [float(r.get_attribute("data-probability")) for r in rows]
    assert set(classes) <= {str(i) for i in range(10)} and len(set(classes)) == 5
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert classes[0] in browser.find_element(By.ID, "status").text  # "3: 12.5%"
    # the bars are drawn to scale: the first is the widest
    widths = [r.find_element(By.CSS_SELECTOR, ".fill").size["width"] for r in rows]
    assert widths[0] == max(widths) and widths[0] > 0
    overlay = wait.until(
        lambda d: (img := d.find_element(By.ID, "overlay")).get_attribute("naturalWidth") not in (None, "0") and img
    )
    assert int(overlay.get_attribute("naturalWidth")) == 224 and overlay.is_displayed()
    preview = browser.find_element(By.ID, "preview")
    assert preview.is_displayed() and int(preview.get_attribute("naturalWidth")) == 112
    # nothing overflows sideways: readable without horizontal scrolling
    assert browser.execute_script("return document.documentElement.scrollWidth") <= width
    browser.save_screenshot(str(_shots(tmp_path) / f"page-{width}.png"))


@pytest.mark.slow
def test_a_bad_file_shows_the_servers_message(server, browser, tmp_path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"these are not pixels")
    browser.set_window_size(1200, 900)
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "classes" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys(str(bad))
    wait.until(lambda d: "not an image" in d.find_element(By.ID, "status").text)
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
    assert not browser.find_elements(By.CSS_SELECTOR, "#predictions li")


@pytest.mark.slow
def test_with_an_api_key_the_browser_sends_it_for_the_page_and_its_requests(
    digits_checkpoint, browser, digit, tmp_path
) -> None:
    with _serve(digits_checkpoint, tmp_path / "serve.log", api_key="k3y") as url:
        browser.get(url + "/")
        assert not browser.find_elements(By.ID, "model")  # no key: the browser's password prompt, not the page
        # the credentials a browser's password prompt gives (any user name, the key as password)
        browser.get(url.replace("http://", "http://user:k3y@") + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "vit_tiny_patch7_28" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "file").send_keys(str(digit))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#predictions li")) == 5)
        wait.until(lambda d: d.find_element(By.ID, "overlay").get_attribute("naturalWidth") == "224")
