"""Everything after the renderer, measured: CPU per frame of paste-back, watermark, colour conversion, H.264 and
AAC, as `vasa generate` runs them (vasa/inference/postprocess.py), and each stage alone.

    python benchmarks/generate_post.py [--sides 512 1024] [--frames 100] [--presets superfast veryfast]
        [--encoder-threads 1] [--threads 1] [--json OUT]

Content: a synthetic portrait of side P (smooth random colour, as benchmarks/generate_throughput.py draws it)
whose central 70 % box is the face crop (scale 1 on whole pixels, as `native_crop` takes it), at the portrait's
own side (the crop side `vasa generate` renders at: max(--crop-size, 0.7 P), 512 at P 512, 716 at P 1024); the
crops are the portrait's own crop under a small moving head (rotation +-3 deg, shift +-4 px) with a dark mouth
opening and closing at 4 Hz, so libx264 sees a still background and a moving face, as in a generated video.
Audio: 48 kHz stereo speech-like noise (the user's audio at its own rate), AAC at params generate.audio_bit_rate.

post       `postprocess.write_video` into a temporary mp4, threaded (the pipeline as beside a CPU renderer:
           one post-processing thread), split (a thread per stage, as beside a CUDA renderer) and sequential
           (the same bytes): CPU-ms per frame = the process's CPU time over all threads / frames, and wall-ms;
           and sequential through whole frames (paste-back, watermark and I420 of every pixel: the path before
           the box-only `BoxComposer`, the same bytes)
paste      `Paster` alone (uint8 blendLinear in the mask's box, reading the crop in place: a whole-pixel
           shift); the float32 blend it replaced; and `Paster` on a crop taken at a fractional scale (warped)
mark       watermark + RGB -> I420 (`mark_frames`) alone; and the watermark alone; and `BoxComposer` (paste,
           watermark and I420 on the face's box only) alone
encode     libx264 on I420 frames (`Encoder`, no audio) at each --presets (CPU-ms and KiB per frame, PSNR of
           the decoded luma against the input's); audio = post's encoder with the track minus without it
Every figure is the least CPU of --repeats runs (threaded and sequential runs alternate): on the shared 2-core
machine the CPU time of the same work varies by up to 1.7x with the other jobs' load. The C2PA signature (once
per file, not per frame) is not included.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np

from vasa.core.config import GenerateConfig, load_params
from vasa.inference.generate import limit_threads
from vasa.inference.portrait import Paster, Portrait
from vasa.inference.postprocess import BoxComposer, Encoder, choose_codec, mark_frames, write_video
from vasa.inference.speech import ArrayTrack
from vasa.labelling.watermark import Watermarker
from vasa.models.motion_encoder import EXPRESSION_DIMS

FPS = 25
AUDIO_RATE = 48000
PAYLOAD = bytes.fromhex("ab" * 8)
TAGS = {"comment": "benchmark"}


def portrait_and_crops(side: int, crop_size: int, frames: int, exact: bool = True) -> tuple[Portrait, np.ndarray]:
    """A (side, side) synthetic portrait and `frames` (T, S, S, 3) crops of its face box at the portrait's own
    side S = max(crop_size, 0.7 side), moving (module docstring); `exact`: the box at scale 1 on whole pixels
    (as `vasa generate` crops), else at a fractional scale and offset."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
    frame = cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC)
    if exact:  # what `native_crop` takes whenever the face box fits [crop_size, max_side]: scale 1, whole pixels
        crop_side = max(crop_size, int(round(0.7 * side / 2)) * 2)
        scale, x0 = 1.0, float((side - crop_side) // 2)
    else:  # a resampled crop (a face box outside that range): the paste-back warps
        box = 0.7 * side
        crop_side = max(crop_size, int(round(box / 2)) * 2)
        scale, x0 = crop_side / box, (side - box) / 2
    transform = np.array([[scale, 0, -scale * x0], [0, scale, -scale * x0]], np.float64)
    crop = cv2.warpAffine(frame, transform, (crop_side, crop_side), flags=cv2.INTER_LINEAR)
    crops = np.empty((frames, crop_side, crop_side, 3), np.uint8)
    centre = (crop_side / 2, crop_side / 2)
    for t in range(frames):
        phase = 2 * np.pi * t / FPS
        motion = cv2.getRotationMatrix2D(centre, 3 * np.sin(0.5 * phase), 1.0)
        motion[:, 2] += 4 * np.sin(0.3 * phase), 4 * np.cos(0.4 * phase)
        moved = cv2.warpAffine(crop, motion, (crop_side, crop_side), borderMode=cv2.BORDER_REPLICATE)
        mouth = (int(crop_side * 0.5), int(crop_side * 0.72))
        opening = int(crop_side * 0.05 * (1 + np.sin(4 * phase)))
        cv2.ellipse(moved, mouth, (int(crop_side * 0.12), opening + 1), 0, 0, 360, (60, 20, 30), -1)
        crops[t] = moved
    zeros = np.zeros(2, np.float32)
    portrait = Portrait(frame=frame, transform=transform, crop=crop, crop_full=crop, full_transform=transform,
                        gaze=zeros, distance=0.0, emotion=zeros, faces=1,
                        expression=np.full(EXPRESSION_DIMS, np.nan, np.float32))  # fmt: skip
    return portrait, crops


def speech_like_stereo(seconds: float, rate: int = AUDIO_RATE) -> np.ndarray:
    """(N, 2) float32: noise under a 4 Hz syllable envelope, the right channel a delayed, quieter copy."""
    t = np.arange(int(seconds * rate)) / rate
    left = np.random.default_rng(0).normal(0, 0.1, len(t)) * np.sin(np.pi * 4 * t) ** 2
    return np.stack([left, 0.6 * np.roll(left, rate // 100)], axis=1).astype(np.float32)


def chunked(frames: np.ndarray, size: int) -> list[np.ndarray]:
    return [frames[start : start + size] for start in range(0, len(frames), size)]


def cpu_wall(fn, repeats: int = 1) -> tuple[float, float]:
    """Process CPU seconds (all threads) and wall seconds of the call with the least CPU of `repeats` (on a
    shared machine the CPU time of the same work varies by up to 1.7x with the load)."""
    runs = []
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        fn()
        runs.append((time.process_time() - cpu, time.perf_counter() - wall))
    return min(runs)


def measure_post(cfg: GenerateConfig, side: int, crop_size: int, frames: int, batch: int,
                 repeats: int = 3) -> dict[str, float]:  # fmt: skip
    """The figures of the module docstring at one portrait side, ms per frame (and KiB per frame); each the
    least CPU of `repeats` runs (threaded and sequential runs alternate)."""
    portrait, crops = portrait_and_crops(side, crop_size, frames)
    paster = Paster(portrait, cfg.feather)
    audio = ArrayTrack(speech_like_stereo(frames / FPS + 0.1), AUDIO_RATE)
    out: dict[str, float] = {"crop_side": crops.shape[1], "frames": frames}
    with tempfile.TemporaryDirectory(prefix="vasa-post-") as folder:
        # post: the box-only composer (write_video given a Paster); whole: the same through whole frames (a
        # plain callable paster: paste-back, then the watermark and I420 of every pixel), the baseline.
        variants = {"post": (True, paster, None), "post_split": (True, paster, True),
                    "post_sequential": (False, paster, None),
                    "post_whole_sequential": (False, lambda chunk: paster(chunk), None)}  # fmt: skip
        runs: dict[str, list[tuple[float, float]]] = {key: [] for key in variants}
        files = {}
        for _ in range(repeats):
            for key, (threaded, paste, split) in variants.items():
                path = Path(folder) / f"{key}.mp4"
                run = functools.partial(write_video, path, chunked(crops, batch), audio, FPS, cfg, TAGS,
                                        watermark=Watermarker(PAYLOAD), paster=paste, threaded=threaded,
                                        split=split)  # fmt: skip
                runs[key].append(cpu_wall(run))
                files[key] = path.read_bytes()
        for key in variants:
            cpu, wall = min(runs[key])
            out[f"{key}_cpu_ms"], out[f"{key}_wall_ms"] = 1000 * cpu / frames, 1000 * wall / frames
        out["threaded_bytes_equal"] = float(files["post"] == files["post_split"] == files["post_sequential"])
        out["box_bytes_equal"] = float(files["post_sequential"] == files["post_whole_sequential"])
        out["kib_per_frame"] = len(files["post"]) / 1024 / frames
    pasted = [paster(chunk) for chunk in chunked(crops, batch)]
    cpu, _ = cpu_wall(lambda: [paster(chunk) for chunk in chunked(crops, batch)], repeats)
    out["paste_cpu_ms"] = 1000 * cpu / frames
    cpu, _ = cpu_wall(lambda: [_float_paste(paster, chunk) for chunk in chunked(crops, batch)], repeats)
    out["paste_float_cpu_ms"] = 1000 * cpu / frames
    warped, warped_crops = portrait_and_crops(side, crop_size, frames, exact=False)
    warper = Paster(warped, cfg.feather)  # a crop at a fractional scale: the paste warps every frame
    cpu, _ = cpu_wall(lambda: [warper(chunk) for chunk in chunked(warped_crops, batch)], repeats)
    out["paste_warp_cpu_ms"] = 1000 * cpu / frames
    marker = Watermarker(PAYLOAD)
    planes = [mark_frames(marker, chunk) for chunk in pasted]
    cpu, _ = cpu_wall(lambda: [mark_frames(marker, chunk) for chunk in pasted], repeats)
    out["mark_cpu_ms"] = 1000 * cpu / frames
    cpu, _ = cpu_wall(lambda: [marker.apply(chunk) for chunk in pasted], repeats)
    out["watermark_cpu_ms"] = 1000 * cpu / frames
    composer = BoxComposer(paster, Watermarker(PAYLOAD))
    cpu, _ = cpu_wall(lambda: [composer(chunk) for chunk in chunked(crops, batch)], repeats)
    out["compose_cpu_ms"] = 1000 * cpu / frames  # paste + watermark + I420 on the box only
    for track, key in ((None, "encode"), (audio, "encode_audio")):

        def encode(track=track) -> None:
            encoder = Encoder(io.BytesIO(), FPS, choose_codec(cfg, "cpu"), track, cfg.audio_bit_rate, TAGS)
            for chunk in planes:
                encoder(chunk)
            encoder.close()

        cpu, _ = cpu_wall(encode, repeats)
        out[f"{key}_cpu_ms"] = 1000 * cpu / frames
    out["audio_cpu_ms"] = out.pop("encode_audio_cpu_ms") - out["encode_cpu_ms"]
    return out


def _float_paste(paster: Paster, crops: np.ndarray) -> np.ndarray:
    """The float32 blend Paster ran before the uint8 one (for the figure beside it)."""
    top, bottom, left, right = paster.box
    out = np.repeat(paster.portrait.frame[None], len(crops), axis=0)
    alpha, base = paster.alpha[..., None], paster.base.astype(np.float32)
    for index, crop in enumerate(crops):
        placed = cv2.warpAffine(crop, paster.warp, (right - left, bottom - top), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REPLICATE)  # fmt: skip
        blend = alpha * placed + (1 - alpha) * base
        out[index, top:bottom, left:right] = np.clip(blend, 0, 255).round().astype(np.uint8)
    return out


def measure_presets(cfg: GenerateConfig, side: int, crop_size: int, frames: int, presets: list[str],
                    threads: list[int], repeats: int = 3) -> list[dict]:  # fmt: skip
    """libx264 alone on the watermarked I420 frames at each preset and thread count: CPU- and wall-ms per frame,
    KiB per frame, and the PSNR of the decoded luma against the encoder's input luma."""
    portrait, crops = portrait_and_crops(side, crop_size, frames)
    pasted = Paster(portrait, cfg.feather)(crops)
    planes = mark_frames(Watermarker(PAYLOAD), pasted)
    height = side
    rows = []
    for preset in presets:
        for count in threads:
            settings = cfg.model_copy(update={"encoder": "libx264", "preset": preset, "encoder_threads": count})
            buffer = io.BytesIO()

            def encode(settings=settings, buffer=buffer) -> None:
                buffer.seek(0)
                buffer.truncate()
                encoder = Encoder(buffer, FPS, choose_codec(settings, "cpu"), None, cfg.audio_bit_rate, TAGS)
                for chunk in chunked(planes, 25):
                    encoder(chunk)
                encoder.close()

            cpu, wall = cpu_wall(encode, repeats)
            buffer.seek(0)
            with av.open(buffer) as container:
                decoded = [f.to_ndarray(format="yuv420p")[:height] for f in container.decode(video=0)]
            errors = [np.mean((d.astype(np.float64) - p[:height]) ** 2) for d, p in zip(decoded, planes, strict=True)]
            rows.append({"side": side, "preset": preset, "threads": count, "cpu_ms": 1000 * cpu / frames,
                         "wall_ms": 1000 * wall / frames, "kib_per_frame": len(buffer.getvalue()) / 1024 / frames,
                         "psnr_y_db": float(10 * np.log10(255**2 / max(np.mean(errors), 1e-12)))})  # fmt: skip
    return rows


def report(post: dict[int, dict[str, float]], presets: list[dict]) -> None:
    print("\n## after the renderer: CPU-ms per frame (all threads), wall-ms per frame in brackets\n")
    print("| portrait | crop side | post, threaded | post, split | post, sequential | whole frames, sequential "
          "| same bytes "
          "| paste (float32 before) | paste of a resampled crop (warp) | watermark + I420 (watermark) "
          "| box composer (paste + watermark + I420) | H.264 | AAC 48 kHz stereo | KiB/frame |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for side, m in post.items():
        same = m["threaded_bytes_equal"] and m["box_bytes_equal"]
        print(f"| {side}² | {m['crop_side']:.0f} | {m['post_cpu_ms']:.2f} ({m['post_wall_ms']:.2f}) "
              f"| {m['post_split_cpu_ms']:.2f} ({m['post_split_wall_ms']:.2f}) "
              f"| {m['post_sequential_cpu_ms']:.2f} ({m['post_sequential_wall_ms']:.2f}) "
              f"| {m['post_whole_sequential_cpu_ms']:.2f} ({m['post_whole_sequential_wall_ms']:.2f}) "
              f"| {'yes' if same else 'NO'} "
              f"| {m['paste_cpu_ms']:.2f} ({m['paste_float_cpu_ms']:.2f}) | {m['paste_warp_cpu_ms']:.2f} "
              f"| {m['mark_cpu_ms']:.2f} ({m['watermark_cpu_ms']:.2f}) | {m['compose_cpu_ms']:.2f} "
              f"| {m['encode_cpu_ms']:.2f} "
              f"| {m['audio_cpu_ms']:.2f} | {m['kib_per_frame']:.1f} |")  # fmt: skip
    if presets:
        print("\n## libx264 alone on the pipeline's I420 frames\n")
        print("| portrait | preset | threads | CPU-ms/frame | wall-ms/frame | KiB/frame | PSNR Y dB |")
        print("|---|---|---|---|---|---|---|")
        for row in presets:
            print(f"| {row['side']}² | {row['preset']} | {row['threads']} | {row['cpu_ms']:.2f} | {row['wall_ms']:.2f} "
                  f"| {row['kib_per_frame']:.1f} | {row['psnr_y_db']:.2f} |")  # fmt: skip


def load_average() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--sides", type=int, nargs="*", default=[512, 1024], help="portrait sides")
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the least CPU is kept")
    parser.add_argument("--crop-size", type=int, default=512, help="the bundle's crop side (real data: 512)")
    parser.add_argument("--presets", nargs="*", default=[], help="libx264 presets to measure alone")
    parser.add_argument("--encoder-threads", type=int, nargs="*", default=[1], help="... at these thread counts")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch, OpenCV and BLAS threads, set as vasa generate sets generate.threads",
    )
    parser.add_argument("--opencv-only", action="store_true",
                        help="set only OpenCV's threads, numpy's BLAS pool left at one thread per core (as before "
                             "vasa.inference.generate.limit_threads): the baseline")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.opencv_only:
        cv2.setNumThreads(args.threads)
    else:
        limit_threads(args.threads)
    cfg = load_params(args.params).generate
    print(f"# {platform.processor() or platform.machine()}, load average {load_average()}, "
          f"{'OpenCV' if args.opencv_only else 'torch, OpenCV and BLAS'} threads {args.threads}; libx264 "
          f"{cfg.preset} CRF {cfg.crf}, {cfg.encoder_threads} thread(s); AAC "
          f"{cfg.audio_bit_rate // 1000} kb/s", flush=True)  # fmt: skip
    post = {side: measure_post(cfg, side, args.crop_size, args.frames, cfg.render_batch, args.repeats)
            for side in args.sides}  # fmt: skip
    presets = [row for side in args.sides for row in measure_presets(cfg, side, args.crop_size, args.frames,
                                                                      args.presets, args.encoder_threads,
                                                                      args.repeats)]  # fmt: skip
    report(post, presets)
    figures = {"post": {str(side): m for side, m in post.items()}, "presets": presets}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    main()
