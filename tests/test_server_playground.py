"""The playground in a real headless browser (Debian's chromium driven by Playwright for Python).

Types a prompt, picks a vector, moves its strength slider, generates, and checks that both panes
streamed text (several chunks each) and differ. The slow variant runs the default model with a
sentiment vector and takes the screenshot shown in the README (it rewrites docs/playground.png only
with STEERLAB_UPDATE_DOCS=1)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
playwright_sync = pytest.importorskip("playwright.sync_api")

import httpx  # noqa: E402

import steerlab as sl  # noqa: E402
from steerlab.server.app import create_app, serve_in_thread  # noqa: E402
from steerlab.server.engine import TorchEngine  # noqa: E402
from steerlab.testing import tiny_model  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    pytest.skip("no Chromium installed (Debian: apt-get install chromium); browser test skipped")


def _drive(
    url: str,
    prompt: str,
    vector: str,
    slider_steps: int,
    screenshot: Path | None,
    *,
    readout: str | None = None,
    max_tokens: int = 12,
) -> dict[str, Any]:
    executable = _chromium()
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1320, "height": 820})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url + "/")
            page.wait_for_function(
                "document.querySelectorAll('#vector-picker option').length > 1", timeout=60_000
            )
            page.fill("#prompt", prompt)
            page.fill("#max-tokens", str(max_tokens))
            page.select_option("#vector-picker", vector)
            slider = page.locator(f'.steer-item[data-vector="{vector}"] input.strength')
            before = float(slider.input_value())
            slider.focus()
            for _ in range(slider_steps):
                page.keyboard.press("ArrowRight")
            after = float(slider.input_value())
            if readout:
                page.select_option("#readout-vector", readout)
            page.click("#generate")
            page.wait_for_function(
                "document.querySelector('#pane-base').dataset.done === 'true' && "
                "document.querySelector('#pane-steered').dataset.done === 'true'",
                timeout=600_000,
            )
            result = {
                "base": page.inner_text("#pane-base"),
                "steered": page.inner_text("#pane-steered"),
                "base_chunks": int(page.get_attribute("#pane-base", "data-chunks") or 0),
                "steered_chunks": int(page.get_attribute("#pane-steered", "data-chunks") or 0),
                "strip": page.locator("#readout-steered span").count(),
                "error": page.inner_text("#error"),
                "slider": (before, after),
                "page_errors": errors,
            }
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
            return result
        finally:
            browser.close()


def test_playground_streams_both_panes(tmp_path: Path) -> None:
    model = tiny_model("llama")
    engine = TorchEngine(model, max_batch=4)
    gen = torch.Generator().manual_seed(3)
    engine.vectors.register(
        "joy",
        sl.SteeringVector(
            {1: torch.randn(model.d_model, generator=gen) * 3}, metadata={"method": "manual"}
        ),
    )
    with serve_in_thread(create_app(engine, max_strength=16.0)) as url:
        got = _drive(
            url,
            "i think the movie was",
            "joy",
            16,
            tmp_path / "shot.png",
            readout="joy",
            max_tokens=12,
        )
    assert got["page_errors"] == [] and got["error"] == ""
    assert got["slider"] == (0.0, 8.0)
    assert got["base"].strip() and got["steered"].strip()
    assert got["base"] != got["steered"]
    assert got["base_chunks"] >= 2 and got["steered_chunks"] >= 2  # streamed, not one blob
    assert got["strip"] == got["steered_chunks"]  # one readout cell per generated token
    assert (tmp_path / "shot.png").stat().st_size > 10_000


@pytest.mark.slow
def test_playground_on_the_default_model_saves_the_screenshot(
    default_model: sl.SteeredModel, tmp_path: Path
) -> None:
    # the README's picture is rewritten only on request, so a test run leaves the tree clean
    shot = (
        DOCS / "playground.png"
        if os.environ.get("STEERLAB_UPDATE_DOCS") == "1"
        else tmp_path / "playground.png"
    )
    layer = 12
    vector = sl.compute_vector(default_model, sl.data.load_builtin("sentiment"), layers=[layer])
    vector = vector.with_metadata(recommended_strength=0.0)
    engine = TorchEngine(default_model, max_batch=4, model_id=default_model.name)
    engine.vectors.register("sentiment", vector)
    with serve_in_thread(create_app(engine, max_strength=16.0)) as url:
        got = _drive(
            url,
            "I think the weather today is",
            "sentiment",
            16,
            shot,
            readout="sentiment",
            max_tokens=32,
        )
    assert got["page_errors"] == [] and got["error"] == ""
    assert got["base"] != got["steered"]
    assert got["base_chunks"] >= 8 and got["steered_chunks"] >= 8
    assert shot.stat().st_size > 10_000


def test_playground_with_an_api_key_keeps_it_and_never_shows_unsteered_text() -> None:
    """A server with --api-key: the key is asked for, kept across a reload (sessionStorage),
    vectors load once it is set, and the steered pane refuses (with an error, sending nothing)
    rather than show an unsteered continuation: no vector, only zero strengths, or a vector the
    server has since deleted."""
    model = tiny_model("llama")
    engine = TorchEngine(model, max_batch=4)
    gen = torch.Generator().manual_seed(3)
    for name in ("joy", "calm"):
        engine.vectors.register(
            name, sl.SteeringVector({1: torch.randn(model.d_model, generator=gen) * 3})
        )
    key = {"Authorization": "Bearer s3cret"}
    executable = _chromium()
    options = "document.querySelectorAll('#vector-picker option').length"
    panes_done = (
        "document.querySelector('#pane-base').dataset.done === 'true' && "
        "document.querySelector('#pane-steered').dataset.done === 'true'"
    )
    with serve_in_thread(create_app(engine, api_key="s3cret", max_strength=16.0)) as url:
        with playwright_sync.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, args=_ARGS, headless=True)
            try:
                page = browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                posts: list[dict[str, Any]] = []
                page.on(
                    "request",
                    lambda r: (
                        posts.append(r.post_data_json)
                        if r.method == "POST" and "completions" in r.url
                        else None
                    ),
                )
                page.goto(url + "/")
                page.wait_for_function("document.querySelector('#error').textContent !== ''")
                assert "API key" in page.inner_text("#error")
                assert page.evaluate(options) == 1  # the placeholder only
                assert page.inner_text("#model-info") == "not connected"

                page.fill("#api-key", "wrong")
                page.press("#api-key", "Enter")
                page.wait_for_function("document.querySelector('#error').textContent !== ''")
                assert "wrong API key" in page.inner_text("#error")
                page.fill("#api-key", "s3cret")
                page.press("#api-key", "Enter")
                page.wait_for_function(f"{options} === 3", timeout=60_000)
                assert page.inner_text("#error") == ""
                stored = page.evaluate("sessionStorage.getItem('steerlab-api-key')")
                assert stored == "s3cret"

                page.reload()  # the key survives: vectors load without typing it again
                page.wait_for_function(f"{options} === 3", timeout=60_000)
                assert page.input_value("#api-key") == "s3cret"
                assert "3 layers · 2 vector(s)" in page.inner_text("#model-info")
                page.fill("#prompt", "i think the movie was")
                page.fill("#max-tokens", "8")

                page.click("#generate")  # no steering yet: refused, nothing sent
                assert "add a steering vector" in page.inner_text("#error")
                page.select_option("#vector-picker", "joy")
                page.click("#generate")  # strength 0: refused too
                assert "strength is 0" in page.inner_text("#error")
                assert posts == []

                slider = page.locator('.steer-item[data-vector="joy"] input.strength')
                slider.focus()
                for _ in range(8):
                    page.keyboard.press("ArrowRight")
                page.click("#generate")
                page.wait_for_function(panes_done, timeout=120_000)
                assert page.inner_text("#error") == ""
                base, steered = page.inner_text("#pane-base"), page.inner_text("#pane-steered")
                assert base.strip() and steered.strip() and base != steered
                assert sorted(len(p.get("steering", [])) for p in posts) == [0, 1]
                sent = next(p for p in posts if p.get("steering"))["steering"][0]
                assert sent["vector"] == "joy" and sent["strength"] == 4.0

                # the vector goes away on the server: the steered pane shows the error, not
                # the unsteered text, and the request it sent still asked for the vector
                assert httpx.delete(url + "/v1/vectors/joy", headers=key).status_code == 200
                posts.clear()
                page.click("#generate")
                page.wait_for_function(
                    "document.querySelector('#pane-steered').dataset.failed === 'true' && "
                    "document.querySelector('#generate').disabled === false",
                    timeout=120_000,
                )
                assert "unknown vector 'joy'" in page.inner_text("#error")
                assert page.inner_text("#pane-steered") == ""
                assert [p["steering"][0]["vector"] for p in posts if p.get("steering")] == ["joy"]
                assert errors == []
            finally:
                browser.close()
