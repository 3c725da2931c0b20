"""The gateway's console (gateway/console/) in a real browser: Debian's
chromium, headless, driven by selenium through chromedriver. The page loads
from the gateway, takes a token, shows a message published after it loaded
within a second, plots the stored rate, and shows a process going down; the
docs' JavaScript client runs in the page too. A screenshot is saved for a
person to look at (BUS_CONSOLE_SCREENSHOT names where; the README's is one)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bus.client import Publisher
from tests.conftest import Bus, wait_for
from tests.test_docs import gateway_js_example
from tests.test_gateway import Gateway, tokens_for

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium or chromedriver missing (apt-get install chromium chromium-driver)")


@pytest.fixture
def browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1100", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def shown(driver: Any, script: str) -> Any:
    return driver.execute_script(script)


def test_the_console_shows_the_bus_live(bus: Bus, tmp_path: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    made = tokens_for(bus, tmp_path / "tokens", {"ops": ["--list", "admins", "--read", "",
                                                         "--publish", ""],
                                                 "desk": ["--list", "readers", "--read", ""]})
    gw = Gateway(bus, BUS_GATEWAY_TOKENS_DIR=tmp_path / "tokens")
    browser.get(f"http://127.0.0.1:{gw.port}/")
    assert browser.title == "bus console"
    # This gateway asks for a token: the page says so, and takes one.
    wait_for(lambda: browser.find_element(By.ID, "token-form").is_displayed(),
             message="the token form")
    # A token that is not an admin's: the page says so and asks again.
    browser.find_element(By.ID, "token").send_keys(made["desk"])
    browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
    wait_for(lambda: "not an admin" in browser.find_element(By.ID, "status").text
             and browser.find_element(By.ID, "token-form").is_displayed(),
             message="the page asking for an admin's token")
    browser.find_element(By.ID, "token").send_keys(made["ops"])
    browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
    wait_for(lambda: browser.find_element(By.ID, "status").get_attribute("data-state") == "open",
             message="the console connected")
    browser.find_element(By.ID, "tail-prefix").send_keys("web.")
    browser.find_element(By.CSS_SELECTOR, "#tail-form button").click()
    wait_for(lambda: "following" in browser.find_element(By.ID, "tail-following").text,
             message="the tail following web.")

    # A message published now is on the page within a second.
    with Publisher(bus.config(), producer_id="to-the-page") as pub:
        pub.publish("web.hello", b"<b>hello</b> browser", wait=True)
        stored_at = time.monotonic()
        wait_for(lambda: shown(browser, "return document.querySelector("
                                        "'#tail li[data-topic=\"web.hello\"]') !== null"),
                 timeout=1.0, interval=0.01, message="the message on the page within 1 s")
        seen_after = time.monotonic() - stored_at
        line = browser.find_element(By.CSS_SELECTOR, "#tail li").text
        assert "<b>hello</b> browser" in line  # as text, never markup

        # A rate, plotted: 3 s of messages at about 300/s.
        stop = threading.Event()

        def publish_for_a_while() -> None:
            i = 0
            while not stop.is_set():
                pub.publish("rates.t", b"%d" % i)
                i += 1
                if i % 30 == 0:
                    time.sleep(0.1)
        publisher = threading.Thread(target=publish_for_a_while)
        publisher.start()
        try:
            wait_for(lambda: shown(browser, "return Number(document.getElementById("
                                            "'stored-rate').textContent.replace(/,/g, '')) || 0") > 50,
                     message="a stored rate on the page")
            wait_for(lambda: shown(browser, "return Number(document.getElementById("
                                            "'rates').dataset.points) || 0") >= 3,
                     message="points plotted")
        finally:
            stop.set()
            publisher.join(timeout=10)
        pub.flush(timeout=10)
    blue = shown(browser, """
        const c = document.getElementById("rates"), d = c.getContext("2d")
          .getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i + 2] > 200 && d[i] < 80) n++;
        return n;""")
    assert blue > 20, "the stored rate's line is drawn"
    topics = shown(browser, "return [...document.querySelectorAll('#topics tbody tr')]"
                            ".map((tr) => tr.cells[0].textContent)")
    assert "rates.t" in topics, topics

    # A durable consumer behind, with its lag.
    bus.request("BUS_CONTROL_ENDPOINT", "consumer_ack",
                {"consumer": "billing", "last_id": 2, "prefixes": ["rates."]})
    wait_for(lambda: shown(browser, "return [...document.querySelectorAll('#consumers tbody tr')]"
                                    ".map((tr) => tr.cells[0].textContent)") == ["billing"],
             message="the consumer listed")

    # A process going down shows.
    def reader_state() -> str:
        return shown(browser, "const tr = document.querySelector('tr[data-process=\"reader\"]');"
                              " return tr && tr.dataset.state")
    assert reader_state() == "up"
    bus.reader.kill()
    wait_for(lambda: reader_state() == "down", message="the reader shown down")
    screenshot = Path(os.environ.get("BUS_CONSOLE_SCREENSHOT") or tmp_path / "console.png")
    assert browser.save_screenshot(str(screenshot))
    print(f"console screenshot: {screenshot} (a message on the page "
          f"{seen_after * 1000:.0f} ms after it was stored)")

    # The docs' JavaScript client, in the page (the browser's own WebSocket).
    example = gateway_js_example().replace('"ws://127.0.0.1:5560/"', f'"ws://127.0.0.1:{gw.port}/"') \
        .replace('"bus_TOKEN"', f'"{made["ops"]}"')
    lines = browser.execute_async_script("""
        const done = arguments[arguments.length - 1], lines = [];
        const console = { log: (line) => lines.push(String(line)) };
        const deadline = Date.now() + 20000;
        (async () => {
    """ + example + """
        })().catch((error) => lines.push("error " + error.message));
        const wait = () => (lines.some((l) => l.startsWith("closed") || l.startsWith("error"))
                            || Date.now() > deadline) ? done(lines) : setTimeout(wait, 50);
        wait();""")
    assert "stored: seq 1" in lines, lines
    assert "stream 0: orders.web hello from js" in lines and "closed 1000 done" in lines, lines
