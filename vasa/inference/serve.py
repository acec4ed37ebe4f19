"""`vasa serve`: talking faces streamed over WebSockets (Starlette on uvicorn), and a page that plays them.

    GET /        the page (static/index.html): a portrait + an audio file or the microphone -> a talking face
    GET /info    JSON: ai_generated, the notice, bundle sha256, fps, sample rates, limits
    WS  /ws      one session per connection:

    client: {"type": "start", "portrait": BASE64 IMAGE, "sample_rate": R, "format": "pcm_s16le", "channels": 1}
    server: {"type": "ready", "ai_generated": true, "notice": ..., "bundle_sha256": ..., "fps", "sample_rate",
             "width", "height", "window_frames", "limits", ...}
    client: binary PCM16 little-endian mono at R (chunks of any size), then {"type": "end"}
    server: binary, header kind (uint8) + frame index (uint32 LE) (vasa/inference/live.py): kind 2 = the audio of
            the frames that follow (PCM16 at the bundle's rate), kind 1 = one watermarked JPEG frame; frame i
            shows audio [i, i + 1) / fps s, exactly one frame per whole 1/fps s of audio, as `vasa generate`
    server: {"type": "done", "frames": N, "audio_seconds": ..., "first_frame_s": ...}, close 1000
    on any error: {"type": "error", "code": ..., "message": ...}, then a close code (live.Refusal)

Bounded by params `serve`: sessions at once (more: "busy", 1013), audio per session, idle time (nothing
received before `end`, or nothing taken by the client), message size (uvicorn drops anything over twice it
before buffering; the app answers the rest), sessions computing at once (serve.workers). A bad session ends
with its own message; the others go on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from vasa.core.config import FaceConfig, GenerateConfig, ServeConfig
from vasa.core.errors import InputError
from vasa.inference.bundle import Bundle
from vasa.inference.generate import package_version
from vasa.inference.live import LiveSession, Refusal, open_live, pcm16
from vasa.labelling.labels import GENERATOR_NAME, TRAINED_ALGORITHMIC_MEDIA

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
NOTICE = (
    "AI-generated video: the face's motion and lip movement are synthesised by {generator} from a still portrait "
    "and the audio; it is not a camera recording. Every frame carries an invisible watermark."
)
START_KEYS = {"type", "portrait", "sample_rate", "format", "channels"}


class Server:
    """What the sessions share: the bundle, the settings, the worker threads and the model slots."""

    def __init__(self, bundle: Bundle, serve: ServeConfig, generate: GenerateConfig, face: FaceConfig) -> None:
        self.bundle, self.cfg, self.generate, self.face = bundle, serve, generate, face
        self.version = package_version()
        # One thread per open session (it waits for audio between windows); serve.workers of them compute at once.
        self.pool = ThreadPoolExecutor(serve.max_sessions, thread_name_prefix="vasa-serve")
        self.compute = threading.Semaphore(serve.workers)
        self.active = 0
        self.live: set[LiveSession] = set()

    def info(self) -> dict:
        meta, cfg = self.bundle.meta, self.cfg
        return {
            "ai_generated": True,
            "notice": NOTICE.format(generator=GENERATOR_NAME),
            "generator": GENERATOR_NAME,
            "version": self.version,
            "bundle_sha256": self.bundle.sha256,
            "digital_source_type": TRAINED_ALGORITHMIC_MEDIA,
            "watermark": f"every frame carries the bundle's sha256[:16] ({self.bundle.sha256[:16]}): `vasa verify`",
            "fps": int(meta["fps"]),
            "sample_rate": int(meta["audio"]["sample_rate"]),
            "sample_rates": list(cfg.sample_rates),
            "format": "pcm_s16le",
            "limits": {
                "max_sessions": cfg.max_sessions,
                "max_audio_seconds": cfg.max_audio_seconds,
                "idle_timeout_s": cfg.idle_timeout_s,
                "max_message_bytes": cfg.max_message_bytes,
            },
        }


def create_app(bundle: Bundle, serve: ServeConfig, generate: GenerateConfig, face: FaceConfig) -> Starlette:
    """The ASGI app: the page, /info and the /ws sessions for one loaded bundle."""
    server = Server(bundle, serve, generate, face)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        for live in list(server.live):
            live.cancel()
        server.pool.shutdown(wait=False, cancel_futures=True)

    async def index(request: Request) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    async def info(request: Request) -> JSONResponse:
        return JSONResponse(server.info())

    async def session(websocket: WebSocket) -> None:
        await run_session(websocket, server)

    routes = [
        Route("/", index),
        Route("/info", info),
        WebSocketRoute("/ws", session),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server
    return app


def server_config(app: Starlette, cfg: ServeConfig, host: str, port: int, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings for `app`: messages over twice serve.max_message_bytes are cut off by the protocol layer
    before they are buffered (close 1009); no per-message compression (JPEG does not shrink, and a small
    compressed message could inflate past the limit)."""
    return uvicorn.Config(app, host=host, port=port, ws_max_size=2 * cfg.max_message_bytes,
                          ws_per_message_deflate=False, log_level=log_level)  # fmt: skip


def serve_forever(app: Starlette, cfg: ServeConfig, host: str, port: int) -> None:
    """Serve until interrupted (Ctrl-C)."""
    uvicorn.Server(server_config(app, cfg, host, port)).run()


# --- one session -------------------------------------------------------------------------------------------


async def run_session(websocket: WebSocket, server: Server) -> None:
    """Admit, run and end one WebSocket session; whatever goes wrong ends this one session only."""
    cfg = server.cfg
    if server.active >= cfg.max_sessions:
        busy = f"server busy: {server.active} sessions already streaming (serve.max_sessions); try again later"
        await websocket.accept()
        await _close(websocket, Refusal("busy", busy, 1013), cfg)
        return
    server.active += 1  # no await since the check: admission is atomic on the event loop
    try:
        await websocket.accept()
        await _stream(websocket, server)
        await websocket.close(1000)
    except Refusal as refusal:
        log.info("session refused: %s (%s)", refusal.message, refusal.code)
        await _close(websocket, refusal, cfg)
    except WebSocketDisconnect:
        log.info("client left mid-session")
    except Exception:  # noqa: BLE001 - a bug in one session must not stop the server: logged, reported, closed
        log.exception("session failed")
        await _close(websocket, Refusal("internal", "internal server error; this session was closed", 1011), cfg)
    finally:
        server.active -= 1


async def _stream(websocket: WebSocket, server: Server) -> None:
    """Start message -> portrait prepared (off the loop) -> ready -> the stream until done."""
    cfg, loop = server.cfg, asyncio.get_running_loop()
    image, rate = await _receive_start(websocket, cfg)
    opening = partial(open_live, server.bundle, image, rate, server.generate, server.face, cfg, server.compute,
                      server.version)  # fmt: skip
    try:
        live = await loop.run_in_executor(server.pool, opening)
    except InputError as err:
        code = "no_face" if "no face" in str(err) else "bad_portrait"
        raise Refusal(code, str(err)) from None
    width, height = live.size
    ready = {"type": "ready", **server.info(), "width": width, "height": height,
             "window_frames": server.bundle.dit.window, "faces": live.session.portrait.faces}  # fmt: skip
    server.live.add(live)
    try:
        await websocket.send_json(ready)
        await _run(websocket, live, rate, server)
    finally:
        live.cancel()
        server.live.discard(live)


async def _run(websocket: WebSocket, live: LiveSession, rate: int, server: Server) -> None:
    """Three tasks until the end is sent: the worker thread (model), the receiver (audio in), the sender (out)."""
    cfg, loop = server.cfg, asyncio.get_running_loop()
    outbox: asyncio.Queue[object] = asyncio.Queue()

    def emit(item: object) -> None:  # called on the worker thread
        loop.call_soon_threadsafe(outbox.put_nowait, item)

    live.emit = emit
    worker = asyncio.ensure_future(loop.run_in_executor(server.pool, live.run))
    receiver = asyncio.ensure_future(_receive_audio(websocket, live, rate, cfg))
    sender = asyncio.ensure_future(_send(websocket, live, outbox, cfg))
    waiting = {worker, receiver, sender}
    try:
        while not sender.done():  # the receiver only ends by raising (after `end` it watches for a disconnect)
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a Refusal, a disconnect or a bug: the session ends
    finally:
        live.cancel()
        for task in (receiver, sender):
            task.cancel()
        await asyncio.gather(receiver, sender, return_exceptions=True)
        await asyncio.wait({worker})  # it stops within one step (POLL_S, or the window it is computing)


async def _receive(websocket: WebSocket, cfg: ServeConfig, timeout: float | None) -> bytes | str:
    """The next message, bytes or text, within serve.max_message_bytes; a disconnect raises."""
    try:
        message = await asyncio.wait_for(websocket.receive(), timeout)
    except TimeoutError:
        raise Refusal("idle", f"nothing received for {timeout:g} s (serve.idle_timeout_s): session closed") from None
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    data = message.get("bytes")
    data = message.get("text", "") if data is None else data
    size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))
    if size > cfg.max_message_bytes:
        raise Refusal("too_large", f"a message of {size:,} bytes is over the limit of {cfg.max_message_bytes:,} "
                      "(serve.max_message_bytes)", 1009)  # fmt: skip
    return data


def _control(data: bytes | str, expected: str) -> dict:
    """A JSON object text message."""
    if isinstance(data, bytes):
        raise Refusal("malformed", f"expected a JSON text message ({expected}), got {len(data)} bytes of binary")
    try:
        message = json.loads(data)
    except ValueError:
        raise Refusal("malformed", f"expected a JSON text message ({expected}), got {data[:40]!r}") from None
    if not isinstance(message, dict):
        raise Refusal("malformed", f"expected a JSON object ({expected}), got {type(message).__name__}")
    return message


async def _receive_start(websocket: WebSocket, cfg: ServeConfig) -> tuple[bytes, int]:
    """The start message -> (portrait bytes, the audio's sample rate), every field checked."""
    start = _control(await _receive(websocket, cfg, cfg.idle_timeout_s), 'the first is {"type": "start", ...}')
    if start.get("type") != "start":
        kind = start.get("type")
        raise Refusal("malformed", f'the first message must be {{"type": "start", ...}}, got type {kind!r}')
    unknown = sorted(set(start) - START_KEYS)
    if unknown:
        raise Refusal("malformed", f"unknown field(s) in start: {', '.join(unknown)} (known: {sorted(START_KEYS)})")
    fmt, channels, rate = start.get("format", "pcm_s16le"), start.get("channels", 1), start.get("sample_rate")
    if fmt != "pcm_s16le":
        raise Refusal("unsupported_audio", f'audio format {fmt!r} is not supported: send "pcm_s16le" (16-bit '
                      "little-endian PCM)", 1003)  # fmt: skip
    if channels != 1 or isinstance(channels, bool):
        raise Refusal("unsupported_audio", f"mono audio only: channels must be 1, got {channels!r}", 1003)
    if not isinstance(rate, int) or isinstance(rate, bool) or rate not in cfg.sample_rates:
        rates = ", ".join(map(str, cfg.sample_rates))
        raise Refusal("unsupported_audio", f"sample_rate {rate!r} is not supported: send one of {rates} Hz "
                      "(serve.sample_rates)", 1003)  # fmt: skip
    portrait = start.get("portrait")
    if not isinstance(portrait, str) or not portrait:
        raise Refusal("malformed", "start needs the portrait: an image file as a base64 string")
    try:
        image = base64.b64decode(portrait.split(",", 1)[-1], validate=True)  # a data: URL's prefix is dropped
    except binascii.Error as err:
        raise Refusal("malformed", f"the portrait is not valid base64 ({err})") from None
    return image, rate


async def _receive_audio(websocket: WebSocket, live: LiveSession, rate: int, cfg: ServeConfig) -> None:
    """Audio chunks into the session until `end`; then only a disconnect (or a stray message) ends it."""
    received, ended = 0, False
    while True:
        data = await _receive(websocket, cfg, None if ended else cfg.idle_timeout_s)
        if ended:
            raise Refusal("malformed", 'nothing may follow {"type": "end"}')
        if isinstance(data, str):
            kind = _control(data, 'binary audio or {"type": "end"}').get("type")
            if kind != "end":
                raise Refusal("malformed", f'expected binary PCM16 audio or {{"type": "end"}}, got type {kind!r}')
            live.finish()
            ended = True
            continue
        samples = pcm16(data)
        received += len(samples)
        if received > cfg.max_audio_seconds * rate:
            raise Refusal("audio_limit", f"more than {cfg.max_audio_seconds:g} s of audio in one session "
                          "(serve.max_audio_seconds)")  # fmt: skip
        if len(samples):
            live.push(samples)


async def _send(websocket: WebSocket, live: LiveSession, outbox: asyncio.Queue[object], cfg: ServeConfig) -> None:
    """The worker's output to the client, in order; a client that takes nothing for serve.idle_timeout_s is
    dropped."""
    while True:
        item = await outbox.get()
        if isinstance(item, Refusal):
            raise item
        try:
            if isinstance(item, dict):
                await asyncio.wait_for(websocket.send_json({"type": "done", **item}), cfg.idle_timeout_s)
                return
            assert isinstance(item, list)
            for message in item:
                await asyncio.wait_for(websocket.send_bytes(message), cfg.idle_timeout_s)
        except TimeoutError:
            raise Refusal("slow_client", f"frames not taken for {cfg.idle_timeout_s:g} s (serve.idle_timeout_s): "
                          "session closed") from None  # fmt: skip
        live.sent()


async def _close(websocket: WebSocket, refusal: Refusal, cfg: ServeConfig) -> None:
    """Tell the client why, then close; a client already gone is left alone."""
    error = {"type": "error", "code": refusal.code, "message": refusal.message}
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, TimeoutError):
        await asyncio.wait_for(websocket.send_json(error), cfg.idle_timeout_s)
        await websocket.close(refusal.close, reason=refusal.message.encode()[:120].decode("utf-8", "ignore"))
