"""Inspecting a media file for the manifest: hash, streams, duration, rates, and whether it reads.

Demuxes every packet (cheap: no decoding) so a truncated file shows up here, and decodes the first
video frame so an unsupported codec does too. Returns manifest fields, status included: a bad file
is a status and a reason, never an exception.
"""

from __future__ import annotations

from pathlib import Path

import av

from preprocessing.ingest import manifest
from preprocessing.ingest.download import file_digest


def probe_media(path: str | Path) -> dict:
    """Manifest fields for the media at `path`: sha256, size_bytes, duration_s, n_frames, fps,
    width, height, audio_sample_rate, audio_channels, status and error.
    """
    path = Path(path)
    try:
        sha256, size = file_digest(path, "sha256"), path.stat().st_size
    except OSError as err:
        return {"status": manifest.MISSING_MEDIA, "error": f"cannot read {path}: {err.strerror or err}"}
    fields: dict = {"sha256": sha256, "size_bytes": size, "error": None}
    if size == 0:
        return fields | {"status": manifest.UNREADABLE, "error": "zero-byte file"}
    try:
        fields |= _streams(path)
    except (av.error.FFmpegError, ValueError, IndexError) as err:
        return fields | {"status": manifest.UNREADABLE, "error": f"{type(err).__name__}: {err}"}
    if fields.get("n_frames", 0) == 0:
        return fields | {"status": manifest.NO_VIDEO, "error": "no video stream with frames"}
    if not fields.get("audio_sample_rate"):
        return fields | {"status": manifest.MISSING_AUDIO, "error": "no audio stream"}
    return fields | {"status": manifest.OK, "error": None}


def _streams(path: Path) -> dict:
    with av.open(str(path)) as container:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        fields: dict = {}
        if audio is not None:
            fields |= {"audio_sample_rate": audio.sample_rate or None, "audio_channels": audio.channels or None}
        if video is None:
            return fields | {"n_frames": 0}
        frames, last_time = 0, 0.0
        for packet in container.demux(video):
            if packet.size == 0:  # the flush packet at the end of the stream
                continue
            frames += 1
            if packet.pts is not None:
                end = (packet.pts + (packet.duration or 0)) * packet.time_base
                last_time = max(last_time, float(end))
        start = float(video.start_time * video.time_base) if video.start_time is not None else 0.0
        rate = video.average_rate or video.guessed_rate
        fields |= {
            "n_frames": frames,
            "width": video.codec_context.width,
            "height": video.codec_context.height,
            "fps": round(float(rate), 6) if rate else None,
            "duration_s": round(max(last_time - start, 0.0), 6) if frames else None,
        }
    if frames:
        _decode_first_frame(path)
    return fields


def _decode_first_frame(path: Path) -> None:
    with av.open(str(path)) as container:
        for _ in container.decode(video=0):
            return
    raise ValueError("no decodable video frame")
