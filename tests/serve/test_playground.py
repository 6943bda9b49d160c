"""The playground page in headless Chromium: side by side, one prompt streams into a column per model."""

import shutil

import httpx
import pytest
from serve_tools import thread_server

KEY = "page-key"


def browser_path() -> str | None:
    return next((path for path in map(shutil.which, ("chromium", "chromium-browser")) if path), None)


@pytest.fixture(scope="module")
def page():
    playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    executable = browser_path()
    if executable is None:
        pytest.skip("no Chromium on this machine: install Debian's `chromium` package to run the playground test")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 800})
        finally:
            browser.close()


def test_side_by_side_streams_each_adapter_into_its_column(page, tiny_llama, adapter_root):
    adapters = [("alpha", str(adapter_root / "alpha")), ("beta", str(adapter_root / "beta"))]
    with thread_server(tiny_llama, adapters, api_key=KEY) as (url, _):
        page.goto(url + "/")
        page.wait_for_selector("#keybar", state="visible", timeout=15000)  # the API refused the page: it asks
        page.fill("#key", KEY)
        page.click("#use-key")
        page.wait_for_selector("#models input[value=beta]", timeout=15000)
        page.check("#mode-compare")
        page.uncheck("#models input[value=tiny]")
        page.check("#models input[value=alpha]")
        page.check("#models input[value=beta]")
        page.fill("#max-tokens", "20")
        page.fill("#temperature", "0")
        page.fill("#prompt", "hello world")
        page.click("#send")
        for name in ("alpha", "beta"):
            page.wait_for_function(
                f"document.querySelector('[data-model={name}] .status').textContent.startsWith('done')",
                timeout=30000)
        shown = {name: page.inner_text(f"[data-model={name}] .answer") for name in ("alpha", "beta")}
        assert page.locator(".column").count() == 2
        for name, text in shown.items():
            body = {"model": name, "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 20,
                    "temperature": 0}
            answer = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                                timeout=30).json()["choices"][0]["message"]["content"]
            assert text == answer and text.strip(), name
        assert shown["alpha"] != shown["beta"]
