"""`vasa serve`'s page in a real headless Chromium (Debian's `chromium`, driven by Playwright; no browser download):
the page loads with its AI-generated notice, streams a speech file (or the microphone: Chromium's fake capture
device reading a file), shows one frame per 1/fps s of audio, the first within FIRST_FRAME_S. `make test` installs
chromium with apt-get where it can (root); without it these tests skip and say so. Server cases: test_serve.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile
import torch

from tests.test_serve import uvicorn_server
from vasa.inference.bundle import load_bundle
from vasa.inference.serve import create_app

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")

CHROMIUM = Path("/usr/bin/chromium")
PORTRAIT = "img01_float_sam_altman_512x512.jpg"
SPEECH = "aud01_sadtalker_RD_Radio31_000.wav"
FPS, SECONDS = 25, 3.0
# From the click to the first frame drawn: decoding the file, the portrait's FaceMesh and encoders, librosa's
# first-call warm-up and one window (25 frames) of the tiny bundle at 4 DDIM steps and 256 px, on the shared
# 2-core CPU: measured 1.0-1.4 s (a session had run in the process before) to 3.5 s (the first); docs/GENERATE.md,
# "Serve". The bound leaves room for a machine several times busier.
FIRST_FRAME_S = 20.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"no browser: Debian's chromium is not at {CHROMIUM} and could not be installed here "
        "(`make test` runs `apt-get install chromium` when it is root with apt-get)",
    ),
]


@pytest.fixture(scope="module")
def url(tiny_bundle: Path, params) -> Iterator[str]:
    """`vasa serve` on uvicorn in a background thread, on a free port of 127.0.0.1."""
    cfg = params.serve.replace(max_side=256)  # smaller frames: a quicker first window on a CPU
    app = create_app(load_bundle(tiny_bundle), cfg, params.generate.replace(steps=4), params.preprocess.face)
    # One intra-op thread: the low-latency stream's per-frame calls otherwise keep OpenMP workers spinning on
    # both cores of the shared machine, and the browser, starved beside them, stalls and skips frames.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with uvicorn_server(app, cfg) as address:
            yield address
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def speech_file(fixtures_dir: Path, tmp_path_factory) -> Path:
    """The first SECONDS of the fixture speech, 16 kHz mono WAV."""
    audio, rate = soundfile.read(fixtures_dir / SPEECH, dtype="float32", always_2d=True)
    assert rate == 16000
    out = tmp_path_factory.mktemp("speech") / "speech.wav"
    soundfile.write(out, audio[: int(SECONDS * rate)].mean(axis=1), rate, subtype="PCM_16")
    return out


def open_page(playwright, url: str, *args: str):
    flags = ["--autoplay-policy=no-user-gesture-required", *args]
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=flags)
    page = browser.new_page()
    page.goto(url)
    notice = page.locator("#notice")
    sync_api.expect(notice).to_be_visible()
    sync_api.expect(notice).to_contain_text("AI-generated")
    sync_api.expect(page.locator(".badge")).to_have_text("AI-generated")
    sync_api.expect(page.locator("#model")).to_contain_text("model ")  # /info loaded
    sync_api.expect(page.locator("#notice-text")).to_contain_text("not a camera recording")
    return browser, page


def mean_brightness(page) -> float:
    return page.evaluate("""() => {
        const c = document.getElementById('video'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2];
        return s / (3 * d.length / 4); }""")


def test_page_plays_a_speech_file_as_a_talking_face(url, fixtures_dir, speech_file):
    with sync_api.sync_playwright() as playwright:
        browser, page = open_page(playwright, url)
        page.set_input_files("#portrait", str(fixtures_dir / PORTRAIT))
        page.set_input_files("#audio", str(speech_file))
        page.click("#play-file")
        page.wait_for_function("window.vasa.firstFrameMs !== null || window.vasa.error", timeout=FIRST_FRAME_S * 1000)
        page.wait_for_function("window.vasa.finished || window.vasa.error", timeout=120_000)
        stats = page.evaluate("window.vasa")
        brightness = mean_brightness(page)
        sync_api.expect(page.locator("#notice")).to_be_visible()
        browser.close()
    counts = f"{stats['frames']} frames received, {stats['shown']} shown, {stats['skipped']} skipped"
    print(f"browser: first frame {stats['firstFrameMs']} ms after the click, {counts} for {SECONDS} s of audio")
    assert stats["error"] is None
    assert stats["ready"]["ai_generated"] is True and len(stats["ready"]["bundle_sha256"]) == 64
    # Every frame of the audio arrived; the page drew them all, bar any it had to skip (over 120 ms late: a
    # busy machine), and those are few.
    assert stats["frames"] == stats["done"]["frames"] == int(SECONDS * FPS) == stats["shown"] + stats["skipped"]
    assert stats["skipped"] <= 0.05 * stats["frames"]
    assert stats["firstFrameMs"] <= FIRST_FRAME_S * 1000
    assert brightness > 20  # a face was drawn, not the empty black canvas


def test_page_streams_the_microphone(url, fixtures_dir, speech_file):
    fake_microphone = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                       f"--use-file-for-fake-audio-capture={speech_file}"]  # fmt: skip
    with sync_api.sync_playwright() as playwright:
        browser, page = open_page(playwright, url, *fake_microphone)
        page.set_input_files("#portrait", str(fixtures_dir / PORTRAIT))
        page.click("#mic")
        spoken = "(window.vasa.rate && window.vasa.sent >= 1.5 * window.vasa.rate) || window.vasa.error"
        page.wait_for_function(spoken, timeout=60_000)  # 1.5 s of the fake microphone sent
        page.click("#stop")
        page.wait_for_function("window.vasa.finished || window.vasa.error", timeout=120_000)
        stats = page.evaluate("window.vasa")
        browser.close()
    assert stats["error"] is None
    expected = stats["sent"] / stats["rate"] * FPS  # soxr may round the resampled length by a sample
    assert abs(stats["frames"] - expected) <= 1 and stats["frames"] == stats["done"]["frames"]
    assert stats["frames"] == stats["shown"] + stats["skipped"] and stats["skipped"] <= 0.05 * stats["frames"]
