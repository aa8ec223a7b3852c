"""The chat page of `alpaca-local serve`, in a real browser: headless Chromium driven by Selenium.

Most tests talk to the real server app with a scripted model (tests/scripted_server.py),
so the answers are known: typing `<img src=x onerror=...>` makes the "model" say it.
One test uses `alpaca-local serve` with the tiny GGUF and compares the page's answer
with the API's. Screenshots go to $ALPACA_LOCAL_ARTIFACTS (default tests/artifacts/).

Needs the Debian packages chromium and chromium-driver (`make browser-deps`, as root)
and selenium (the test extra); without them these tests are skipped, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")

from alpaca_local.template import Turn, render_prompt  # noqa: E402
from servers import TIMEOUT, Server  # noqa: E402

try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # the HTTP-level tests below still run
    webdriver = None

CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1100,900")
INSTALL = ("install them with `make browser-deps` (as root: apt-get install -y chromium chromium-driver)")


def artifacts() -> Path:
    path = Path(os.environ.get("ALPACA_LOCAL_ARTIFACTS", Path(__file__).parent / "artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if webdriver is None:
        pytest.skip("browser tests need selenium: pip install -e '.[test]'; and chromium: " + INSTALL)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_exe = shutil.which("chromedriver")
    if not chromium or not driver_exe:
        pytest.skip(f"browser tests need chromium and chromedriver, not found: {INSTALL}")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")  # fresh profile
    driver = webdriver.Chrome(options=options, service=Service(driver_exe))
    driver.set_page_load_timeout(TIMEOUT)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def scripted(tiny_gguf: Path):
    srv = Server.scripted(tiny_gguf)
    yield srv
    assert srv.stop() == 0, "".join(srv.err)[-2000:]


class Page:
    """The chat page in the browser, with the steps a person takes."""

    def __init__(self, driver, base: str) -> None:
        self.driver = driver
        driver.get(base + "/")
        self.wait_until(lambda d: self.status() != "", "a status line")

    def find(self, css: str):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def wait_until(self, condition, what: str, timeout: float = TIMEOUT):
        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(condition, f"waited for {what}")

    def status(self) -> str:
        return self.find("#status").text

    def type(self, instruction: str, input_text: str = "") -> None:
        box = self.find("#instruction")
        box.clear()
        box.send_keys(instruction)
        if input_text:
            self.find("#input").send_keys(input_text)

    def send_with_enter(self, instruction: str, input_text: str = "") -> None:
        self.type(instruction, input_text)
        self.find("#instruction").send_keys(Keys.ENTER)

    def answers(self):
        return self.driver.find_elements(By.CSS_SELECTOR, ".turn.assistant")

    def last_answer(self):
        return self.answers()[-1]

    def wait_answer_done(self):
        self.wait_until(lambda d: self.find("#send").is_enabled(), "the answer to finish")
        return self.last_answer()

    def screenshot(self, name: str) -> Path:
        path = artifacts() / name
        self.driver.save_screenshot(str(path))
        return path


def test_instruction_and_input_stream_into_the_page(browser, scripted) -> None:
    page = Page(browser, scripted.base)
    assert page.status() == "ready" and "scripted" in page.find("#model").text
    page.send_with_enter("Summarize **this** in `one` line.", "Llamas are camelids.")
    # Streamed: the text grows in the page before the answer is complete.
    seen = page.wait_until(lambda d: page.last_answer().get_attribute("data-raw"), "the first streamed piece")
    answer = page.wait_answer_done()
    full = "Echo: Summarize **this** in `one` line. | Input: Llamas are camelids."
    assert answer.get_attribute("data-raw") == full and len(seen) < len(full)
    # Markdown rendered as elements built from text.
    assert answer.find_element(By.CSS_SELECTOR, ".answer strong").text == "this"
    assert answer.find_element(By.CSS_SELECTOR, ".answer code").text == "one"
    user = page.driver.find_elements(By.CSS_SELECTOR, ".turn.user")[-1]
    assert "Llamas are camelids." in user.find_element(By.CSS_SELECTOR, ".input").text
    assert page.find("#instruction").get_attribute("value") == ""  # ready for the next one
    assert page.screenshot("web-chat.png").stat().st_size > 1000


def test_model_html_renders_as_text(browser, scripted) -> None:
    page = Page(browser, scripted.base)
    attack = ('<img src=x onerror="document.title=\'pwned\'"> <script>document.title=\'pwned\'</script> '
              '[click](javascript:alert(1)) <b>bold?</b>')
    page.send_with_enter(attack)
    answer = page.wait_answer_done()
    shown = answer.find_element(By.CSS_SELECTOR, ".answer").text
    assert "<img src=x onerror=" in shown and "<script>" in shown and "<b>bold?</b>" in shown
    for tag in ("img", "script", "b", "a"):
        assert not page.driver.find_elements(By.CSS_SELECTOR, f"#conversation {tag}"), tag
    assert page.driver.title == "alpaca-local chat"
    page.screenshot("web-html-as-text.png")


def test_stop_a_long_answer_frees_the_server(browser, scripted) -> None:
    page = Page(browser, scripted.base)
    page.find("#max-tokens").clear()
    page.find("#max-tokens").send_keys("300")  # 15 s of words unless stopped (the context is 512)
    page.send_with_enter("slow answer please")
    page.wait_until(lambda d: "word3" in (page.last_answer().get_attribute("data-raw") or ""), "some words")
    page.find("#stop").click()
    answer = page.wait_answer_done()
    assert answer.find_element(By.CSS_SELECTOR, ".note").text == "(stopped)"
    words = answer.get_attribute("data-raw")
    time.sleep(0.3)
    assert answer.get_attribute("data-raw") == words  # nothing more arrives
    # The model was freed: the next question is answered at once, not after 300 words.
    started = time.monotonic()
    page.send_with_enter("And now?")
    assert page.wait_answer_done().get_attribute("data-raw") == "Echo: And now?"
    assert time.monotonic() - started < 10
    page.screenshot("web-stopped.png")


def test_exact_prompt_comes_from_the_server_and_history_is_kept(browser, scripted) -> None:
    page = Page(browser, scripted.base)
    page.send_with_enter("First question", "with context")
    page.wait_answer_done()
    page.type("Second question")
    page.find("#show-prompt").click()
    page.wait_until(lambda d: page.find("#prompt-view").is_displayed(), "the prompt view")
    shown = page.driver.execute_script("return document.getElementById('prompt-text').textContent")
    expected = render_prompt([Turn("First question", "with context", "Echo: First question | Input: with context"),
                              Turn("Second question")])
    assert shown == expected
    assert "tokens of 512" in page.find("#prompt-tokens").text
    page.screenshot("web-prompt.png")


def test_a_request_waiting_in_line_says_so(browser, scripted) -> None:
    page = Page(browser, scripted.base)
    holder = _hold_the_model(scripted.base, 4)
    page.wait_until(lambda d: _queue(scripted.base, None)["running"], "the other client to hold the model")
    page.send_with_enter("Behind the other one")
    note = page.wait_until(lambda d: "in line" in page.last_answer().text and page.last_answer().text, "the note")
    assert "waiting for the model: 1 request in line, this one included" in note
    assert page.wait_answer_done().get_attribute("data-raw") == "Echo: Behind the other one"
    holder.join(TIMEOUT)


def test_shift_enter_is_a_new_line(browser, scripted) -> None:
    page = Page(browser, scripted.base)
    box = page.find("#instruction")
    box.send_keys("line one")
    box.send_keys(Keys.SHIFT, Keys.ENTER)
    box.send_keys("line two")
    assert box.get_attribute("value") == "line one\nline two" and not page.answers()
    box.send_keys(Keys.ENTER)
    assert page.wait_answer_done().get_attribute("data-raw") == "Echo: line one\nline two"


def _hold_the_model(base: str, seconds_of_words: int, key: str | None = None) -> threading.Thread:
    """A slow streamed request from another client, read to the end in a thread."""
    body = json.dumps({"messages": [{"role": "user", "content": "slow"}], "stream": True,
                       "max_tokens": int(seconds_of_words / 0.05)}).encode()
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(base + "/v1/chat/completions", body, headers)

    def read() -> None:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            response.read()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_key_busy_and_down_are_said_plainly(browser, tiny_gguf) -> None:
    srv = Server.scripted(tiny_gguf, "--api-key", "k3y", "--max-queue", "0")
    try:
        page = Page(browser, srv.base)  # the page itself needs no key
        assert "API key" in page.status() and page.find("#key-box").is_displayed()
        page.find("#api-key").send_keys("k3y")
        page.send_with_enter("With the key")
        assert page.wait_answer_done().get_attribute("data-raw") == "Echo: With the key"
        holder = _hold_the_model(srv.base, 2, key="k3y")
        page.wait_until(lambda d: _queue(srv.base, "k3y")["running"], "the other client to hold the model")
        page.send_with_enter("While busy")
        page.wait_answer_done()
        assert "server is busy" in page.status() and "try again in" in page.status()
        assert "error" in page.last_answer().get_attribute("class")
        assert page.find("#instruction").get_attribute("value") == "While busy"  # kept, to send again
        page.screenshot("web-busy.png")
        holder.join(TIMEOUT)
    finally:
        srv.stop()
    page.find("#send").click()
    page.wait_answer_done()
    assert "Cannot reach the server" in page.status()
    page.screenshot("web-down.png")


def _queue(base: str, key: str | None) -> dict:
    request = urllib.request.Request(base + "/alpaca/status", headers={"authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        return json.load(response)["queue"]


def test_page_answer_equals_the_api_answer_on_the_real_server(browser, tiny_gguf) -> None:
    """`alpaca-local serve` with the tiny GGUF: at temperature 0 the page shows what the API returns."""
    import openai

    srv = Server.serve(tiny_gguf, 256)
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
        expected = client.chat.completions.create(
            model="x", temperature=0, max_tokens=16,
            messages=[{"role": "user", "content": "Name three colors.", "input": "red green"}],
        ).choices[0].message.content
        page = Page(browser, srv.base)
        page.find("#temperature").clear()
        page.find("#temperature").send_keys("0")
        page.find("#max-tokens").clear()
        page.find("#max-tokens").send_keys("16")
        page.send_with_enter("Name three colors.", "red green")
        assert (page.wait_answer_done().get_attribute("data-raw") or "") == expected
        page.screenshot("web-real-model.png")
    finally:
        assert srv.stop() == 0


# ---------------------------------------------------------------------------------------
# The page over plain HTTP (no browser needed)
# ---------------------------------------------------------------------------------------

def http(srv: Server, method: str, path: str, body: dict | None = None, headers: dict | None = None):
    request = urllib.request.Request(srv.base + path, json.dumps(body).encode() if body is not None else None,
                                     {"content-type": "application/json", **(headers or {})}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture(scope="module")
def keyed(tiny_gguf: Path):
    srv = Server.serve(tiny_gguf, 256, "--api-key", "k3y", "--cors-origin", "http://ui.example:3000")
    yield srv
    assert srv.stop() == 0


def test_the_page_and_its_files_need_no_key_and_forbid_inline_script(keyed) -> None:
    for path, kind in (("/", "text/html"), ("/web/app.js", "text/javascript"), ("/web/style.css", "text/css")):
        status, headers, data = http(keyed, "GET", path)
        assert status == 200 and headers["content-type"].startswith(kind) and data
        assert "script-src 'self'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
    assert b"https://" not in http(keyed, "GET", "/")[2]  # nothing fetched from elsewhere: works offline
    assert http(keyed, "GET", "/alpaca/status")[0] == 401  # the API still wants the key
    assert http(keyed, "POST", "/alpaca/prompt", {"messages": []})[0] == 401


def test_the_prompt_endpoint_is_the_servers_template(keyed) -> None:
    auth = {"authorization": "Bearer k3y"}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A?", "input": "ctx"},
                {"role": "assistant", "content": "B."}, {"role": "user", "content": "</s> C?"}]
    status, _, data = http(keyed, "POST", "/alpaca/prompt", {"messages": messages}, auth)
    shown = json.loads(data)
    assert status == 200 and shown["context"] == 256
    assert shown["prompt"] == render_prompt([Turn("A?", "ctx", "B."), Turn("</s> C?")], "Be brief.")
    status, _, data = http(keyed, "POST", "/alpaca/prompt", {"messages": [{"role": "assistant", "content": "x"}]}, auth)
    assert status == 400 and "must follow a user message" in json.loads(data)["error"]["message"]


def test_cors_only_for_the_given_origins(keyed, tiny_gguf) -> None:
    preflight = {"origin": "http://ui.example:3000", "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"}
    status, headers, _ = http(keyed, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert status == 200 and headers["access-control-allow-origin"] == "http://ui.example:3000"
    status, headers, _ = http(keyed, "OPTIONS", "/v1/chat/completions",
                              headers={**preflight, "origin": "http://evil.example"})
    assert status == 400 and "access-control-allow-origin" not in headers
    _, headers, _ = http(keyed, "GET", "/v1/models", headers={"origin": "http://ui.example:3000"})
    assert headers["access-control-allow-origin"] == "http://ui.example:3000"  # on the 401 too
    plain = Server.serve(tiny_gguf, 256)  # none by default
    try:
        _, headers, _ = http(plain, "GET", "/v1/models", headers={"origin": "http://ui.example:3000"})
        assert not any(h.lower().startswith("access-control") for h in headers)
    finally:
        plain.stop()


@pytest.mark.parametrize("flags, says", [
    (["--cors-origin", "http://x/path"], "--cors-origin 'http://x/path': give scheme://host[:port]"),
    (["--max-queue", "-1"], "--max-queue -1: give 0 to 100000"),
    (["--send-timeout", "0"], "--send-timeout 0: give more than 0 seconds"),
])
def test_bad_serve_flags_are_one_line(tiny_gguf, flags, says) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "alpaca_local", "serve", str(tiny_gguf), *flags],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and says in done.stderr, done.stderr


def test_serve_help_defaults_match_the_library() -> None:
    from alpaca_local.cli import serve_cmd
    from alpaca_local.run import fairqueue

    assert serve_cmd.DEFAULT_MAX_WAITING == fairqueue.DEFAULT_MAX_WAITING
    assert serve_cmd.DEFAULT_SEND_TIMEOUT == fairqueue.DEFAULT_SEND_TIMEOUT
