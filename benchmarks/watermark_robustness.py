"""How well the video watermark (vasa/labelling/watermark.py) survives re-encoding, resizing and cropping, how
often it fires on unmarked video, what it costs in PSNR and how fast it runs.

    python benchmarks/watermark_robustness.py [--fixtures ../shared/fixtures] [--lengths 2 5 8]
        [--null-trials 20] [--seed 0] [--only vid01 ...]

The default (2 s clips, 20 random unmarked excerpts) takes a few minutes on one core; the table in
docs/BENCHMARKS.md is from `--lengths 2 5 8 --null-trials 60`.

For each real fixture video (vid*.mp4 and vox2_*.mp4 in PROVENANCE.csv) and each clip length it has
(the first N seconds, written at 25 fps whatever the source rate): a random 8-byte payload is
embedded, and the mark is read back after
  (a) a first libx264 encode at CRF 18 (preset medium, as preprocessing.media.write_mp4 writes),
  (b) (a) re-encoded at CRF 23, (c) (a) re-encoded at CRF 28,
  (d) (a) resized to 0.5x (area filter) and encoded at CRF 23,
  (e) (a) cropped to 90 % of each side at a random offset and encoded at CRF 23.
"detected" counts readings the detector accepts (sync z above the threshold, or a CRC-verified
payload with sync z above the CRC gate); "exact" those whose 8 bytes are all right; "bits"
is the mean fraction of the 64 bits right (over all readings, a missed detection counting the bits
decoded at the best window anyway). False positives: the unmarked clips after (a), a marked clip read
with another key, and --null-trials unmarked random excerpts (random start, 2-10 s, random crop of
80-100 % per side, random 0.5-1x resize, CRF 23). Speeds are frames per second of one process
(embed: `embed` on decoded frames; detect: `detect` on decoded frames, decoding not included).
"""

from __future__ import annotations

import argparse
import csv
import platform
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np

from preprocessing.media import write_mp4
from vasa.labelling import watermark

FPS = 25
ATTACKS = ("crf18", "re-crf23", "re-crf28", "half+crf23", "crop90+crf23")


def read(path: Path, max_frames: int | None = None) -> np.ndarray:
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if max_frames is not None and len(frames) >= max_frames:
                break
            frames.append(frame.to_ndarray(format="rgb24"))
    return np.stack(frames)


def encode(frames: np.ndarray, crf: int, workdir: Path) -> np.ndarray:
    """frames -> libx264 mp4 at `crf` -> decoded frames (what a re-upload gives back)."""
    path = workdir / "clip.mp4"
    write_mp4(path, frames, fps=FPS, crf=crf)
    return read(path)


def even(size: float) -> int:
    return max(2, int(size) // 2 * 2)


def resize(frames: np.ndarray, scale_y: float, scale_x: float) -> np.ndarray:
    h, w = frames.shape[1:3]
    size = (even(w * scale_x), even(h * scale_y))
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])


def crop(frames: np.ndarray, keep_y: float, keep_x: float, rng: np.random.Generator) -> np.ndarray:
    h, w = frames.shape[1:3]
    ch, cw = even(h * keep_y), even(w * keep_x)
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return np.ascontiguousarray(frames[:, y0 : y0 + ch, x0 : x0 + cw])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    error = np.mean((a.astype(np.float64) - b) ** 2)
    return float(10 * np.log10(255**2 / max(error, 1e-12)))


def bits_right(reading: watermark.WatermarkReading, payload: bytes, frames: np.ndarray) -> float:
    decoded = reading.payload if reading.payload is not None else watermark.read_bits(frames)
    a = np.unpackbits(np.frombuffer(decoded, np.uint8))
    return float(np.mean(a == np.unpackbits(np.frombuffer(payload, np.uint8))))


def fixture_videos(fixtures: Path, only: list[str]) -> list[Path]:
    with open(fixtures / "PROVENANCE.csv", newline="") as f:
        names = [row["file"] for row in csv.DictReader(f)]
    names = [n for n in names if n.endswith(".mp4") and n.startswith(("vid", "vox2_"))]
    return [fixtures / n for n in names if not only or any(n.startswith(o) for o in only)]


def attacked(first: np.ndarray, workdir: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "crf18": first,
        "re-crf23": encode(first, 23, workdir),
        "re-crf28": encode(first, 28, workdir),
        "half+crf23": encode(resize(first, 0.5, 0.5), 23, workdir),
        "crop90+crf23": encode(crop(first, 0.9, 0.9, rng), 23, workdir),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixtures", type=Path, default=Path("../shared/fixtures"))
    parser.add_argument("--lengths", type=float, nargs="+", default=[2], help="seconds (default: a ~3 min run)")
    parser.add_argument("--null-trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=[], help="file name prefixes to keep")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    videos = fixture_videos(args.fixtures, args.only)
    print(
        f"machine: {platform.processor() or platform.machine()}, {platform.platform()}; threshold {watermark.THRESHOLD}"
    )

    rows, null_scores, psnrs = [], [], []
    embed_time = embed_frames = detect_time = detect_frames = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for path in videos:
            source = read(path, int(max(args.lengths) * FPS))
            unmarked = watermark.detect(encode(source, 18, workdir))
            null_scores.append(("unmarked " + path.name, unmarked.score, unmarked.detected))
            for seconds in args.lengths:
                count = int(seconds * FPS)
                if len(source) < count:
                    continue
                clip = source[:count]
                payload = rng.bytes(watermark.PAYLOAD_BYTES)
                start = time.process_time()
                marked = watermark.embed(clip, payload)
                embed_time += time.process_time() - start
                embed_frames += count
                psnrs.append(psnr(marked, clip))
                first = encode(marked, 18, workdir)
                for attack, frames in attacked(first, workdir, rng).items():
                    start = time.process_time()
                    reading = watermark.detect(frames)
                    detect_time += time.process_time() - start
                    detect_frames += len(frames)
                    rows.append((path.name, seconds, attack, reading, bits_right(reading, payload, frames), payload))
                other = watermark.detect(first, key="another-key")
                null_scores.append((f"other key {path.name} {seconds:g}s", other.score, other.detected))
                print(
                    f"{path.name} {seconds:g}s PSNR {psnrs[-1]:.2f} dB: "
                    + ", ".join(
                        f"{r[2]} z={r[3].score:.1f} {'ok' if r[3].payload == payload else 'MISS'}"
                        f"{'+crc' if r[3].verified else ''} bits={r[4]:.3f}"
                        for r in rows[-len(ATTACKS) :]
                    ),
                    flush=True,
                )
        null_scores += null_trials(videos, args.null_trials, workdir, rng)

    report(rows, null_scores, psnrs, args.lengths)
    print(
        f"\nembed {embed_frames / embed_time:.0f} frames/s, detect {detect_frames / detect_time:.0f} frames/s "
        "(CPU time of this process; frame sizes as in the fixtures)"
    )


def null_trials(
    videos: list[Path], trials: int, workdir: Path, rng: np.random.Generator
) -> list[tuple[str, float, bool]]:
    """Unmarked random excerpts: random video, start, length 2-10 s, crop, resize; CRF 23."""
    scores = []
    for _ in range(trials):
        path = videos[int(rng.integers(len(videos)))]
        frames = read(path)
        length = int(rng.uniform(2, 10) * FPS)
        start = int(rng.integers(0, max(1, len(frames) - length)))
        clip = frames[start : start + length]
        clip = crop(clip, rng.uniform(0.8, 1.0), rng.uniform(0.8, 1.0), rng)
        clip = resize(clip, *([rng.uniform(0.5, 1.0)] * 2))
        reading = watermark.detect(encode(clip, 23, workdir))
        scores.append((f"random excerpt {path.name}", reading.score, reading.detected))
    return scores


def report(rows, null_scores, psnrs, lengths) -> None:
    print("\n| clip length | attack | clips | detected | exact (verified) | bits right | z (min / median) |")
    print("|---|---|---|---|---|---|---|")
    for seconds in lengths:
        for attack in ATTACKS:
            sel = [r for r in rows if r[1] == seconds and r[2] == attack]
            if not sel:
                continue
            z = np.array([r[3].score for r in sel])
            print(
                f"| {seconds:g} s | {attack} | {len(sel)} | {sum(r[3].detected for r in sel)} "
                f"| {sum(r[3].payload == r[5] for r in sel)} ({sum(r[3].verified for r in sel)}) "
                f"| {np.mean([r[4] for r in sel]):.3f} "
                f"| {z.min():.1f} / {np.median(z):.1f} |"
            )
    scores = np.array([s for _, s, _ in null_scores])
    print(
        f"\nfalse positives: {sum(d for _, _, d in null_scores)} of {len(scores)} unmarked/other-key readings "
        f"detected; their sync z: max {scores.max():.2f}, median {np.median(scores):.2f}, "
        f"{int(np.sum(scores > watermark.CRC_GATE))} above the CRC gate {watermark.CRC_GATE} "
        f"(threshold {watermark.THRESHOLD})"
    )
    print(f"PSNR marked vs unmarked: min {min(psnrs):.2f} dB, mean {np.mean(psnrs):.2f} dB")


if __name__ == "__main__":
    main()
