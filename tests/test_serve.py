"""`vasa serve` (vasa/inference/serve.py, live.py) through Starlette's TestClient: a session streams one watermarked,
labelled JPEG frame per 1/fps s of audio with that audio back; every bad input ends its own session with a clear
message and a close code while the server goes on serving the others. The page in a real browser:
tests/test_serve_browser.py."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
from PIL import Image
from starlette.testclient import TestClient

from vasa.cli import main as cli_main
from vasa.core.config import Params, ServeConfig
from vasa.inference.bundle import Bundle, load_bundle
from vasa.inference.live import AUDIO, FRAME, HEADER
from vasa.inference.serve import create_app, server_config
from vasa.labelling.watermark import detect

PORTRAIT = "img01_float_sam_altman_512x512.jpg"
SPEECH = "aud01_sadtalker_RD_Radio31_000.wav"
RATE, FPS = 16000, 25


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    return load_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def portrait(fixtures_dir: Path) -> str:
    return base64.b64encode((fixtures_dir / PORTRAIT).read_bytes()).decode()


@pytest.fixture(scope="module")
def speech(fixtures_dir: Path) -> np.ndarray:
    """(n,) float32 speech at 16 kHz, PCM16-exact (what a client sends is what it gets back)."""
    audio, rate = soundfile.read(fixtures_dir / SPEECH, dtype="float32", always_2d=True)
    mono = audio.mean(axis=1)
    mono = mono if rate == RATE else soxr.resample(mono, rate, RATE)
    return np.round(mono * 32767).astype(np.float32) / 32768


@contextmanager
def serving(bundle: Bundle, params: Params, **limits) -> Iterator[TestClient]:
    """The app with params' serve section (some bounds changed), 256-pixel frames and 4 DDIM steps (fast on a CPU)."""
    cfg = params.serve.replace(**{"max_side": 256, **limits})
    app = create_app(bundle, cfg, params.generate.replace(steps=4), params.preprocess.face)
    with TestClient(app) as client:
        yield client


@contextmanager
def uvicorn_server(app, cfg: ServeConfig) -> Iterator[str]:
    """The app on uvicorn (as `vasa serve` runs it) in a background thread, on a free port of 127.0.0.1: its URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app, cfg, "127.0.0.1", port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def pcm(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 32767 / 32768) * 32768).round().astype("<i2").tobytes()


def start(ws, portrait: str, rate: int = RATE, **fields) -> dict:
    ws.send_json({"type": "start", "portrait": portrait, "sample_rate": rate, "format": "pcm_s16le", "channels": 1,
                  **fields})  # fmt: skip
    return ws.receive_json()


def send_audio(ws, samples: np.ndarray, rate: int, end: bool = True) -> None:
    for begin in range(0, len(samples), rate // 10):  # 100 ms chunks, as a microphone sends them
        ws.send_bytes(pcm(samples[begin : begin + rate // 10]))
    if end:
        ws.send_json({"type": "end"})


def until_close(ws) -> tuple[list[dict], list[bytes], int]:
    """Every message until the server closes: (JSON messages, binary messages, close code)."""
    texts: list[dict] = []
    blobs: list[bytes] = []
    while True:
        message = ws.receive()
        if message["type"] == "websocket.close":
            return texts, blobs, message["code"]
        if message.get("bytes") is not None:
            blobs.append(message["bytes"])
        else:
            texts.append(json.loads(message["text"]))


def refused(ws) -> tuple[dict, int]:
    """The error message and close code a refused session ends with."""
    texts, _, code = until_close(ws)
    assert texts and texts[-1]["type"] == "error", texts
    return texts[-1], code


def split(blobs: list[bytes]) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    """Binary messages -> (frames, audio) as (frame index, payload)."""
    frames, audio = [], []
    for blob in blobs:
        kind, index = HEADER.unpack_from(blob)
        (frames if kind == FRAME else audio).append((index, blob[HEADER.size :]))
        assert kind in (FRAME, AUDIO)
    return frames, audio


def no_face_png() -> str:
    out = io.BytesIO()
    Image.new("RGB", (256, 256), (128, 128, 128)).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_page_and_info_say_ai_generated(bundle, params):
    with serving(bundle, params) as client:
        page = client.get("/")
        info = client.get("/info").json()
        script = client.get("/static/app.js")
    assert page.status_code == 200 and "AI-generated" in page.text and "/static/app.js" in page.text
    assert script.status_code == 200 and "WebSocket" in script.text
    assert info["ai_generated"] is True and "AI-generated" in info["notice"]
    assert info["bundle_sha256"] == bundle.sha256 and info["fps"] == FPS and info["sample_rate"] == RATE
    assert info["limits"]["max_sessions"] == params.serve.max_sessions


@pytest.mark.slow
def test_stream_sends_one_watermarked_frame_per_frame_of_audio_and_the_audio_back(bundle, params, portrait, speech):
    audio = speech[: int(3.0 * RATE)]
    with serving(bundle, params) as client, client.websocket_connect("/ws") as ws:
        ready = start(ws, portrait)
        send_audio(ws, audio, RATE)
        texts, blobs, code = until_close(ws)
    assert ready["type"] == "ready" and ready["ai_generated"] is True and ready["bundle_sha256"] == bundle.sha256
    assert (ready["width"], ready["height"]) == (256, 256) and ready["fps"] == FPS and "AI-generated" in ready["notice"]
    assert code == 1000 and texts[-1]["type"] == "done" and texts[-1]["frames"] == 3 * FPS
    frames, returned = split(blobs)
    assert [index for index, _ in frames] == list(range(3 * FPS))
    # The audio comes back before the frames that show it, chunk by chunk (one frame each: the low-latency
    # stream, generate.stream_hop < W, yields frame by frame), exactly as sent.
    assert params.generate.stream_hop < bundle.dit.window
    assert [index for index, _ in returned] == list(range(3 * FPS))
    back = np.concatenate([np.frombuffer(data, "<i2") for _, data in returned])
    np.testing.assert_array_equal(back, np.frombuffer(pcm(audio), "<i2"))
    # Each frame is a JPEG that says it is AI-generated; together they carry the bundle's watermark.
    images = [Image.open(io.BytesIO(data)) for _, data in frames]
    assert all(b"AI-generated" in image.info["comment"] and bundle.sha256.encode() in image.info["comment"]
               for image in images)  # fmt: skip
    reading = detect(np.stack([np.asarray(image.convert("RGB")) for image in images]))
    assert reading.detected and reading.payload == bytes.fromhex(bundle.sha256)[:8]


@pytest.mark.slow
def test_many_clients_at_once_bad_ones_alone_fail_and_48k_is_resampled(bundle, params, portrait, speech):
    audio = speech[: int(2.0 * RATE)]
    loud = soxr.resample(audio, RATE, 48000)  # a browser's rate
    with (
        serving(bundle, params, max_sessions=3, workers=2) as client,
        client.websocket_connect("/ws") as first,
        client.websocket_connect("/ws") as second,
    ):
        assert start(first, portrait)["type"] == "ready"
        assert start(second, portrait, rate=48000)["type"] == "ready"
        send_audio(first, audio[: RATE // 2], RATE, end=False)  # both streaming while the others come and go
        with client.websocket_connect("/ws") as bad:
            bad.send_text("not json")
            error, code = refused(bad)
        assert error["code"] == "malformed" and code == 1008
        with client.websocket_connect("/ws") as third, client.websocket_connect("/ws") as fourth:
            error, code = refused(fourth)  # three open: first, second, third
            assert error["code"] == "busy" and code == 1013 and "serve.max_sessions" in error["message"]
            assert start(third, portrait)["type"] == "ready"
            third.send_bytes(b"\x00\x01\x02")  # half a sample
            error, code = refused(third)
            assert error["code"] == "bad_audio" and "2 bytes a sample" in error["message"] and code == 1003
        send_audio(first, audio[RATE // 2 :], RATE)
        send_audio(second, loud, 48000)
        results = [until_close(ws) for ws in (first, second)]
    for texts, blobs, code in results:
        frames, returned = split(blobs)
        assert code == 1000 and texts[-1]["frames"] == len(frames) == 2 * FPS
        assert sum(len(data) // 2 for _, data in returned) == 2 * FPS * RATE // FPS


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_frees_its_slot(bundle, params, portrait, speech):
    with serving(bundle, params, max_sessions=1) as client:
        server = client.app.state.server  # type: ignore[attr-defined]
        with client.websocket_connect("/ws") as ws:
            assert start(ws, portrait)["type"] == "ready"
            send_audio(ws, speech[: 2 * RATE], RATE, end=False)
            assert ws.receive()["type"] == "websocket.send"  # frames are coming
        deadline = time.monotonic() + 30
        while server.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.active == 0 and not server.live
        with client.websocket_connect("/ws") as ws:  # the one slot is free again
            assert start(ws, portrait)["type"] == "ready"
            send_audio(ws, speech[: RATE // 2], RATE)
            texts, _, code = until_close(ws)
        assert code == 1000 and texts[-1]["frames"] == FPS // 2


@pytest.mark.parametrize(
    ("fields", "code", "close", "words"),
    [
        ({"sample_rate": 11025}, "unsupported_audio", 1003, ["11025", "16000", "serve.sample_rates"]),
        ({"sample_rate": "16000"}, "unsupported_audio", 1003, ["'16000'"]),
        ({"format": "f32le"}, "unsupported_audio", 1003, ["'f32le'", "pcm_s16le"]),
        ({"channels": 2}, "unsupported_audio", 1003, ["mono", "got 2"]),
        ({"portrait": "not base64!"}, "malformed", 1008, ["base64"]),
        ({"portrait": ""}, "malformed", 1008, ["portrait"]),
        ({"seed": 3}, "malformed", 1008, ["unknown field", "seed"]),
        ({"type": "hello"}, "malformed", 1008, ["'hello'", "start"]),
        ({"portrait": base64.b64encode(b"hello").decode()}, "bad_portrait", 1008, ["portrait: not a readable image"]),
        ({"portrait": no_face_png()}, "no_face", 1008, ["portrait: no face found in the portrait"]),
    ],
)
def test_a_bad_start_is_refused_clearly(bundle, params, fields, code, close, words):
    with serving(bundle, params) as client:
        with client.websocket_connect("/ws") as ws:
            ws.send_json({"type": "start", "portrait": no_face_png(), "sample_rate": RATE, **fields})
            error, got = refused(ws)
        assert error["code"] == code and got == close and all(word in error["message"] for word in words), error
        assert client.get("/info").status_code == 200 and client.app.state.server.active == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("send", "code", "words"),
    [
        (lambda ws: ws.send_text("{not json"), "malformed", ["JSON"]),
        (lambda ws: ws.send_text("[1, 2]"), "malformed", ["JSON object", "list"]),
        (lambda ws: ws.send_bytes(b"\x00" * 64), "malformed", ["binary"]),
        (lambda ws: ws.send_text("x" * 5000), "too_large", ["5,000 bytes", "4,096", "serve.max_message_bytes"]),
        (lambda ws: ws.send_bytes(b"\x00" * 5000), "too_large", ["5,000 bytes"]),
        (lambda ws: None, "idle", ["0.3 s", "serve.idle_timeout_s"]),
    ],
)
def test_malformed_oversized_or_missing_first_messages_are_refused(bundle, params, send, code, words):
    with serving(bundle, params, max_message_bytes=4096, idle_timeout_s=0.3) as client:
        with client.websocket_connect("/ws") as ws:
            send(ws)
            error, close = refused(ws)
        assert error["code"] == code and all(word in error["message"] for word in words), error
        assert close == (1009 if code == "too_large" else 1008)


@pytest.mark.parametrize(
    ("after_start", "code", "words"),
    [
        (lambda ws: ws.send_json({"type": "pause"}), "malformed", ["'pause'", "end"]),
        (lambda ws: ws.send_bytes(b"\x00" * (2 * RATE)), "audio_limit", ["0.5 s", "serve.max_audio_seconds"]),
        (lambda ws: None, "idle", ["1 s", "serve.idle_timeout_s"]),
        (lambda ws: (ws.send_json({"type": "end"}), ws.send_json({"type": "end"})), "malformed", ["follow"]),
    ],
)
def test_bad_messages_during_a_session_end_it_clearly(bundle, params, portrait, after_start, code, words):
    with serving(bundle, params, max_audio_seconds=0.5, idle_timeout_s=1.0) as client:
        with client.websocket_connect("/ws") as ws:
            assert start(ws, portrait)["type"] == "ready"
            after_start(ws)
            error, close = refused(ws)
        assert error["code"] == code and close == 1008 and all(word in error["message"] for word in words), error


def test_uvicorn_answers_a_large_message_and_cuts_off_a_huge_one(bundle, params):
    """Over serve.max_message_bytes the app answers (too_large); over twice it uvicorn closes before buffering."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    cfg = params.serve.replace(max_message_bytes=4096)
    with uvicorn_server(create_app(bundle, cfg, params.generate, params.preprocess.face), cfg) as url:
        address = url.replace("http", "ws") + "ws"
        with connect(address, max_size=None, proxy=None) as ws:
            ws.send(b"\x00" * 5000)
            error = json.loads(ws.recv(timeout=10))
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
        assert error["code"] == "too_large" and ws.close_code == 1009
        with connect(address, max_size=None, proxy=None) as ws:
            ws.send(b"\x00" * 100_000)
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
        assert ws.close_code == 1009
        with connect(address, max_size=None, proxy=None) as ws:  # and the server goes on
            ws.send(json.dumps({"type": "start", "portrait": no_face_png(), "sample_rate": 11025}))
            assert json.loads(ws.recv(timeout=10))["code"] == "unsupported_audio"


def test_serve_settings_are_checked_and_a_missing_bundle_is_one_line(params, tmp_path, capsys):
    with pytest.raises(ValueError, match="sample_rates must lie within"):
        params.serve.replace(sample_rates=[100])
    assert cli_main(["serve", "--bundle", str(tmp_path / "missing")]) == 2
    assert "vasa serve: no bundle" in capsys.readouterr().err
