"""The chat page in a real browser: Debian's ``chromium`` driven by ``playwright`` (its own browsers are not needed).

- With the tiny real model, its stream held open by the test (:class:`HeldOpen`: it pauses until the test lets it
  go on, then waits for the Stop), so nothing depends on a reply outlasting the clicks: type, press Enter, watch
  text stream in, press Stop; the server sees the disconnect. Screenshot: ``artifacts/serve_chat.png``.
- With the deterministic ``FakeBackend`` (its reply holds a fenced code block with ``<`` in it): fenced code
  becomes ``<pre><code>``, HTML is shown as text, Shift+Enter is a newline, errors are shown, New chat clears,
  an API key is asked for on a 401 and kept in localStorage. Screenshot (dark scheme):
  ``artifacts/serve_chat_code.png``.

- A 64-token model: the default max tokens ("auto") fits the reply into the context left by the prompt.
- The page opens in the mode the model was trained for (``kind`` in /v1/models): Complete for a base model (the
  tiny real model, as every model nanochat-train makes today), whose completion streams into the monospace box and
  equals the API's own completion of the same text, and whose header says it is a base model; Chat for a chat model.
  Both modes can be switched to. Screenshot: ``artifacts/serve_complete.png``.

The page must make no request outside the server, raise no JavaScript error and trip no Content-Security-Policy
rule (its script and style carry the server's nonce). Code is checked to be monospace by measuring glyphs. Skipped
only when no
``chromium`` executable is installed (``apt-get install chromium``).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from serve_fakes import FakeBackend, ServerThread, build_tiny_model, parse_metrics

from nanochat.serve import EngineBackend, GenerationParams, Settings, create_app
from nanochat.serve.backend import Delta

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` executable (Debian: apt-get install chromium)")

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
LONG_CTX = 8192
TIMEOUT_MS = 30_000
expect.set_options(timeout=TIMEOUT_MS)


def wait_until(pred: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def metric(url: str, name: str) -> float:
    return parse_metrics(httpx.get(url + "/metrics", timeout=10).text)[name]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],  # root in a container, no GPU
        )
        try:
            yield b
        finally:
            b.close()


class Watched:
    """A page plus what it did: requests it made and JavaScript errors it raised."""

    def __init__(self, browser: Browser, base_url: str, **context: Any) -> None:
        self.context = browser.new_context(viewport={"width": 1000, "height": 720}, **context)
        self.page: Page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        # a CSP violation (an inline script or style without the nonce) is a console error, not a page error
        self.page.on("console", lambda m: self.errors.append(m.text) if "Content Security Policy" in m.text else None)
        self.base_url = base_url

    def check_clean(self) -> None:
        assert not self.errors, self.errors
        outside = [u for u in self.requests if not (u.startswith(self.base_url) or u.startswith("data:"))]
        assert not outside, outside

    def close(self) -> None:
        self.context.close()


class HeldOpen:
    """A real backend whose stream the test paces: it streams until ``pause_chars`` characters, waits for
    :attr:`more`, streams ``then`` more deltas, and then waits for the cancel event (the page's Stop), however fast
    the engine is. Everything else is the wrapped backend's."""

    def __init__(self, inner: EngineBackend, pause_chars: int = 300, then: int = 20) -> None:
        self.inner, self.pause_chars, self.then = inner, pause_chars, then
        self.more = threading.Event()
        self.held = threading.Event()  # set once the stream waits for the Stop
        self.ended_early: str | None = None  # a finish reason that came before the Stop

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def stream(self, prompt_ids: Any, params: GenerationParams, cancel: threading.Event) -> Iterator[Delta]:
        chars, after = 0, None
        for d in self.inner.stream(prompt_ids, params, cancel):
            if d.finish_reason is not None and not cancel.is_set():
                self.ended_early = d.finish_reason
            yield d
            if d.finish_reason is not None:
                return
            chars += len(d.text)
            if after is None and chars >= self.pause_chars:
                while not (self.more.wait(0.01) or cancel.is_set()):
                    pass
                after = 0
            elif after is not None:
                after += 1
                if after >= self.then:
                    self.held.set()
                    cancel.wait(120)  # bounded: a failed test must not hang the server's shutdown
                    yield Delta("", None, "cancelled")
                    return


def test_stream_and_stop_with_the_real_model(browser: Browser, tmp_path: Path) -> None:
    real = EngineBackend.from_path(build_tiny_model(tmp_path / "tiny-chat.gguf", seq_len=LONG_CTX), threads=1)
    backend = HeldOpen(real)
    with ServerThread(create_app(backend, Settings(max_concurrent=2))) as srv:  # type: ignore[arg-type]
        w = Watched(browser, srv.url)
        page = w.page
        page.goto(srv.url + "/")
        expect(page.locator("#model")).to_contain_text("tiny-chat")
        expect(page.locator("#model")).to_contain_text(f"context {LONG_CTX}")
        expect(page.locator("#mode-complete")).to_have_attribute("aria-pressed", "true")  # a base model
        page.click("#mode-chat")  # chat is still there, at the user's choice
        expect(page.locator("#prompt")).to_be_visible()
        page.fill("#max-tokens", "8000")  # far more than the test will wait for
        page.fill("#prompt", "Write a function that adds two numbers")
        page.press("#prompt", "Enter")

        expect(page.locator(".msg.user .body")).to_have_text("Write a function that adds two numbers")
        reply = page.locator(".msg.assistant").last
        expect(reply).to_have_attribute("data-state", "streaming")
        expect(page.locator("#stop")).to_be_visible()
        expect(page.locator("#send")).to_be_hidden()
        body = reply.locator(".body")
        page.wait_for_function(
            "() => { const b = document.querySelector('.msg.assistant .body'); return b && b.innerText.length > 150; }"
        )
        first = len(body.inner_text())  # the stream is paused here until the test says more
        assert metric(srv.url, "nanochat_requests_in_flight") == 1
        backend.more.set()
        page.wait_for_function(
            f"() => document.querySelector('.msg.assistant .body').innerText.length > {first}"
        )  # it keeps growing: streamed, not delivered at the end
        assert backend.held.wait(30)  # now it waits for the Stop: the reply cannot end before the click
        expect(reply).to_have_attribute("data-state", "streaming")

        page.click("#stop")
        expect(reply).to_have_attribute("data-state", "stopped")
        expect(reply.locator(".note")).to_have_text("stopped")
        expect(page.locator("#send")).to_be_visible()
        expect(page.locator("#stop")).to_be_hidden()
        expect(page.locator("#prompt")).to_be_focused()
        # the abort reached the server: the generation was cancelled and its slot given back
        assert wait_until(lambda: metric(srv.url, "nanochat_requests_cancelled_total") == 1)
        assert wait_until(lambda: metric(srv.url, "nanochat_requests_in_flight") == 0)
        assert metric(srv.url, "nanochat_generated_tokens_total") < 8000
        stopped_text = body.inner_text()
        assert len(stopped_text) > 150
        assert backend.ended_early is None

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "serve_chat.png"))
        w.check_clean()
        w.close()


def test_code_blocks_escaping_errors_new_chat_and_api_key(browser: Browser) -> None:
    backend = FakeBackend(
        reply="Here you go:\n```python\nprint(1 < 2)  # <b>not bold</b>\n```\nUse `add` & enjoy.", kind="chat"
    )
    with ServerThread(create_app(backend, Settings(api_key="k3y", max_tokens_limit=100))) as srv:
        w = Watched(browser, srv.url, color_scheme="dark")
        page = w.page
        page.goto(srv.url + "/")
        expect(page.locator("#max-tokens")).to_have_value("")  # auto: the server fits the reply to the context
        # /v1/models answered 401: the page asks for the key
        expect(page.locator("#keybar")).to_be_visible()
        page.fill("#api-key", "k3y")
        page.click("#keybar button")
        expect(page.locator("#keybar")).to_be_hidden()
        expect(page.locator("#model")).to_contain_text("fake")
        assert page.evaluate("localStorage.getItem('nanochat.apiKey')") == "k3y"

        page.fill("#temperature", "0")  # the fake shuffles words at temperature > 0
        page.click("#prompt")
        page.keyboard.type("first line")
        page.keyboard.press("Shift+Enter")  # a newline, not a send
        page.keyboard.type("second line")
        expect(page.locator("#prompt")).to_have_value("first line\nsecond line")
        expect(page.locator(".msg")).to_have_count(0)
        page.keyboard.press("Enter")

        reply = page.locator(".msg.assistant").last
        expect(reply).to_have_attribute("data-state", "done")
        expect(page.locator(".msg.user .body")).to_have_text("first line\nsecond line")
        code = reply.locator("pre code")
        expect(code).to_have_text("print(1 < 2)  # <b>not bold</b>")  # shown as text, not markup
        expect(reply.locator("b")).to_have_count(0)
        # monospace for real: narrow and wide glyphs take the same width in code
        widths = code.evaluate(
            """e => ['iiiiiiiiii', 'MMMMMMMMMM'].map(t => {
                const s = document.createElement('span'); s.textContent = t; e.appendChild(s);
                const w = s.getBoundingClientRect().width; s.remove(); return w; })"""
        )
        assert widths[0] > 0 and abs(widths[0] - widths[1]) < 0.5, widths
        expect(reply.locator("pre .lang")).to_have_text("python")
        expect(reply.locator(":not(pre) > code")).to_have_text("add")
        expect(reply.locator(".note")).to_contain_text("tokens")

        page.fill("#prompt", "x" * 300)  # longer than the fake's 256-token context: a 400, shown to the user
        page.press("#prompt", "Enter")
        error = page.locator(".msg.error")
        expect(error).to_be_visible()
        expect(error).to_contain_text("maximum context length is 256 tokens")
        expect(page.locator("#send")).to_be_visible()

        page.click("#new-chat")
        expect(page.locator(".msg")).to_have_count(0)
        expect(page.locator("#empty")).to_be_visible()
        page.fill("#max-tokens", "5000")  # over the server's limit (100): clamped by the page
        page.fill("#prompt", "show me code")
        page.press("#prompt", "Enter")
        expect(page.locator(".msg.assistant").last).to_have_attribute("data-state", "done")
        ARTIFACTS.mkdir(exist_ok=True)
        expect(page.locator("#max-tokens")).to_have_value("100")
        expect(page.locator(".msg.assistant").last.locator("pre code")).to_have_text("print(1 < 2)  # <b>not bold</b>")
        page.screenshot(path=str(ARTIFACTS / "serve_chat_code.png"))
        w.check_clean()
        w.close()


def test_the_default_max_tokens_fits_a_small_context(browser: Browser) -> None:
    """A 64-token model: the first message must not ask for more tokens than the context has room for."""
    backend = FakeBackend(reply="x" * 500, context_length=64, kind="chat")  # would run past any context
    with ServerThread(create_app(backend)) as srv:
        w = Watched(browser, srv.url)
        page = w.page
        page.goto(srv.url + "/")
        expect(page.locator("#model")).to_contain_text("context 64")
        expect(page.locator("#max-tokens")).to_have_attribute("placeholder", "auto (≤ 64)")
        page.fill("#temperature", "0")
        page.fill("#prompt", "hello there")
        page.press("#prompt", "Enter")
        reply = page.locator(".msg.assistant").last
        expect(reply).to_have_attribute("data-state", "done")
        expect(reply.locator(".note")).to_contain_text("stopped at max tokens")
        prompt_tokens = len(backend.tokenizer.render_chat([{"role": "user", "content": "hello there"}]))
        assert len(reply.locator(".body").inner_text()) == 64 - prompt_tokens  # one byte per token: the rest
        expect(page.locator(".msg.error")).to_have_count(0)
        w.check_clean()
        w.close()


def is_monospace(page: Page, selector: str) -> bool:
    """Narrow and wide glyphs take the same width in the element's font (measured on a canvas in that font)."""
    widths = page.evaluate(
        """sel => { const c = document.createElement('canvas').getContext('2d');
            c.font = getComputedStyle(document.querySelector(sel)).font;
            return ['iiiiiiiiii', 'MMMMMMMMMM'].map(t => c.measureText(t).width); }""",
        selector,
    )
    return bool(widths[0] > 0 and abs(widths[0] - widths[1]) < 0.5)


def test_a_base_model_opens_in_complete_mode_and_streams_into_the_box(browser: Browser, tmp_path: Path) -> None:
    """The tiny real model (a base model): the page opens in Complete mode, says what is loaded, continues the box's
    text in place (at temperature 0 exactly what /v1/completions answers for the same text), and Stop aborts."""
    real = EngineBackend.from_path(build_tiny_model(tmp_path / "tiny-base.gguf", seq_len=LONG_CTX), threads=1)
    backend = HeldOpen(real)
    with ServerThread(create_app(backend, Settings(max_concurrent=2))) as srv:  # type: ignore[arg-type]
        w = Watched(browser, srv.url)
        page = w.page
        page.goto(srv.url + "/")
        expect(page.locator("#kind")).to_have_text("base model — completes code; chat replies are untrained")
        expect(page.locator("#mode-complete")).to_have_attribute("aria-pressed", "true")
        expect(page.locator("#mode-chat")).to_have_attribute("aria-pressed", "false")
        expect(page.locator("#complete-view")).to_be_visible()
        expect(page.locator("#messages")).to_be_hidden()
        expect(page.locator("#prompt")).to_be_hidden()
        expect(page.locator("#send")).to_have_text("Complete")
        expect(page.locator("#document")).to_be_focused()
        assert is_monospace(page, "#document")

        prompt = "def add(a, b):\n"
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "24")
        page.fill("#document", prompt)
        page.keyboard.press("Enter")  # a newline in code, not a completion
        expect(page.locator("#document")).to_have_value(prompt + "\n")
        page.fill("#document", prompt)
        page.keyboard.press("Control+Enter")
        view = page.locator("#complete-view")
        expect(view).to_have_attribute("data-state", "done")
        got = page.locator("#document").input_value()
        body = {"prompt": prompt, "max_tokens": 24, "temperature": 0}
        want = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert want and got == prompt + want  # continued in place: the prompt, then the model's own completion
        expect(page.locator("#complete-note")).to_contain_text("24 tokens")
        expect(page.locator("#complete-note")).to_contain_text("stopped at max tokens")

        # "auto" max tokens, the stream held open by the test: it grows in the box, then Stop aborts it
        backend.ended_early = None  # the runs above ended at their max tokens; this one must not end before Stop
        page.fill("#max-tokens", "")
        page.fill("#temperature", "0.8")
        page.click("#send")
        expect(view).to_have_attribute("data-state", "streaming")
        expect(page.locator("#stop")).to_be_visible()
        grown = f"() => document.querySelector('#document').value.length > {len(got) + 150}"
        page.wait_for_function(grown)
        first = len(page.locator("#document").input_value())
        backend.more.set()
        page.wait_for_function(f"() => document.querySelector('#document').value.length > {first}")
        assert backend.held.wait(30)
        expect(page.locator("#document")).not_to_be_editable()  # read-only while the reply streams into it
        page.click("#stop")
        expect(view).to_have_attribute("data-state", "stopped")
        expect(page.locator("#complete-note")).to_have_text("stopped")
        expect(page.locator("#document")).to_be_editable()
        assert page.locator("#document").input_value().startswith(got)
        assert wait_until(lambda: metric(srv.url, "nanochat_requests_cancelled_total") == 1)
        assert wait_until(lambda: metric(srv.url, "nanochat_requests_in_flight") == 0)
        assert backend.ended_early is None
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "serve_complete.png"))

        page.click("#mode-chat")  # the user may still chat with it
        expect(page.locator("#messages")).to_be_visible()
        expect(page.locator("#complete-view")).to_be_hidden()
        expect(page.locator("#status")).to_contain_text("base model")
        page.click("#mode-complete")
        assert page.locator("#document").input_value().startswith(got)  # the box kept its text
        w.check_clean()
        w.close()


def test_auto_max_tokens_in_complete_mode_fits_the_context_and_errors_are_shown(browser: Browser) -> None:
    """A 64-token base model: "auto" asks for exactly what the context leaves after the text (one token per byte,
    plus <|bos|>); a text that fills the context is an error on the page, not a request the server refuses."""
    backend = FakeBackend(reply="y" * 500, context_length=64)  # a base model, as FakeBackend is by default
    with ServerThread(create_app(backend, Settings(api_key="k3y"))) as srv:
        w = Watched(browser, srv.url)
        page = w.page
        page.goto(srv.url + "/")
        page.fill("#api-key", "k3y")
        page.click("#keybar button")
        expect(page.locator("#mode-complete")).to_have_attribute("aria-pressed", "true")
        page.fill("#temperature", "0")
        text = "x = 1\n"
        page.fill("#document", text)
        page.click("#send")
        expect(page.locator("#complete-view")).to_have_attribute("data-state", "done")
        room = 64 - (1 + len(text.encode()))
        assert page.locator("#document").input_value() == text + "y" * room
        expect(page.locator("#complete-note")).to_contain_text(f"{room} tokens")

        page.fill("#document", "z" * 70)
        page.click("#send")
        expect(page.locator("#complete-view")).to_have_attribute("data-state", "error")
        expect(page.locator("#complete-error .msg.error")).to_contain_text("fills the model's context")
        page.click("#new-chat")  # "Clear" in this mode
        expect(page.locator("#document")).to_have_value("")
        w.check_clean()
        w.close()


def test_a_chat_model_opens_in_chat_mode(browser: Browser) -> None:
    backend = FakeBackend(reply="Sure:\n```python\nx = 1\n```", kind="chat")
    with ServerThread(create_app(backend)) as srv:
        w = Watched(browser, srv.url)
        page = w.page
        page.goto(srv.url + "/")
        expect(page.locator("#kind")).to_have_text("chat model")
        expect(page.locator("#mode-chat")).to_have_attribute("aria-pressed", "true")
        expect(page.locator("#mode-complete")).to_have_attribute("aria-pressed", "false")
        expect(page.locator("#prompt")).to_be_visible()
        expect(page.locator("#prompt")).to_be_focused()
        expect(page.locator("#complete-view")).to_be_hidden()
        expect(page.locator("#status")).to_have_text("")
        page.fill("#temperature", "0")
        page.fill("#prompt", "write x = 1")
        page.press("#prompt", "Enter")
        reply = page.locator(".msg.assistant").last
        expect(reply).to_have_attribute("data-state", "done")
        expect(reply.locator("pre code")).to_have_text("x = 1")
        page.click("#mode-complete")
        expect(page.locator("#complete-view")).to_be_visible()
        expect(page.locator("#send")).to_have_text("Complete")
        w.check_clean()
        w.close()
