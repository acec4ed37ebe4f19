"""What low-latency streaming costs in quality: `stream` with a short hop and a bounded look-ahead against
offline generation (whole windows), on the demo's held-out sentences, by the judge-free measures.

    python benchmarks/stream_quality.py [--bundle data/bundle] [--sample data/sample] [--configs 2:2 1:0 ...]
        [--seeds 0 1 2] [--json out.json]            # a config HOP:LOOKAHEAD:STEPS also sets the DDIM steps

Inputs as the `demo` stage (vasa/stages/demo.py) makes them: for each speaker of the sample corpus its held-out
clip (the last by id), whose first frame is the portrait and whose audio is the speech, with params' generate
settings (the portrait's own gaze, distance and emotion; the bundle's guidance and steps; pose smoothing).
Every clip is generated offline (`stream` with hop None: what `vasa generate` does) and streamed with each
--configs HOP:LOOKAHEAD (frames; the audio arrives in 20 ms chunks, and the result does not depend on the
chunking), once per --seeds seed. The pasted-back frames (before the watermark and H.264, which the demo's
figures include) are measured by vasa.evaluation.independent.measure_video: mouth opening vs loudness (r, lag,
opening std), yaw-change lag-1 autocorrelation (jitter: -0.5 for white noise in the yaw, -1 for flicker),
sharpness against the portrait. Also timed: DiT seconds per frame (process CPU, `WindowStream` only) and the
audio the first frame waits for.

Printed: per clip and mode the means over seeds with their range; overall means; each streaming mode against
offline (ratio of mouth r and of opening std, difference of yaw autocorrelation) beside offline's own
seed-to-seed range, which is the noise such a comparison cannot go below.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from preprocessing.decode import read_audio, read_frames
from vasa.core.config import load_params
from vasa.evaluation.independent import measure_video
from vasa.inference import generate
from vasa.inference.bundle import load_bundle
from vasa.inference.generate import chunks, conditions_for, limit_threads, open_session, stream
from vasa.inference.portrait import prepare_portrait
from vasa.stages.demo import pick_clips

CHUNK_S = 0.02  # audio arrives in 20 ms chunks
KEYS = ("mouth_r", "mouth_lag", "mouth_std", "yaw_lag1_autocorr", "sharpness_ratio", "faces_found")


class DitClock:
    """Process CPU seconds spent sampling DiT windows (vasa.diffusion.WindowStream._window), counted by wrapping
    the generator that `stream` advances."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.windows = 0
        self._original = generate.WindowStream._window

    def __enter__(self) -> DitClock:
        clock, original = self, self._original

        def timed(windows, final):
            start = time.process_time()
            try:
                return original(windows, final)
            finally:
                clock.seconds += time.process_time() - start
                clock.windows += 1

        generate.WindowStream._window = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc) -> None:
        generate.WindowStream._window = self._original  # type: ignore[method-assign]


def clip_session(bundle, params, source: Path, work: Path):
    """A held-out clip's frames, its speech at the bundle's rate, and its first frame (written to `work`) as the
    portrait: (frames, speech, portrait, session)."""
    frames = read_frames(source)[0]
    speech = read_audio(source, bundle.meta["audio"]["sample_rate"])
    image = work / f"{source.stem}.png"
    Image.fromarray(frames[0]).save(image)
    portrait = prepare_portrait(image, bundle.resolution, bundle.meta["crop"]["crop_size"], params.preprocess.face,
                                params.generate.max_side)  # fmt: skip
    return frames, speech, portrait, open_session(bundle, portrait)


def run_clip(bundle, params, clip: dict, sample: Path, configs: list[tuple[int, int, int | None] | None],
             seeds: list[int], work: Path, overlap: int) -> list[dict]:  # fmt: skip
    """Every mode x seed of one held-out clip -> rows of measures."""
    rate, fps = bundle.meta["audio"]["sample_rate"], bundle.meta["fps"]
    real, speech, portrait, session = clip_session(bundle, params, sample / clip["file"], work)
    first = real[0]
    rows = []
    for config in configs:
        for seed in seeds:
            hop, lookahead, steps = config if config is not None else (None, 0, None)
            conditions = conditions_for(portrait, bundle, params.generate, seed=seed)
            if steps is not None:
                conditions = replace(conditions, steps=steps)
            wall = time.perf_counter()
            with DitClock() as clock:
                frames = np.concatenate(list(stream(session, chunks(speech, int(rate * CHUNK_S)), conditions,
                                                    hop=hop, lookahead=lookahead, overlap=overlap)))  # fmt: skip
            wall = time.perf_counter() - wall
            seen = measure_video(frames, speech, fps, first, params.preprocess.face, sample_rate=rate)
            mode = "offline" if config is None else f"{hop}:{lookahead}" + ("" if steps is None else f":{steps}")
            rows.append({"clip": clip["clip_id"], "mode": mode, "seed": seed, "frames": len(frames),
                         "dit_cpu_ms_per_frame": 1000 * clock.seconds / len(frames), "dit_windows": clock.windows,
                         "wall_s": wall, **{key: seen[key] for key in KEYS}})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def summarise(rows: list[dict], window: int) -> dict:
    """Means over clips and seeds per mode, the offline seed range, and each mode against offline."""
    modes = list(dict.fromkeys(row["mode"] for row in rows))
    clips = list(dict.fromkeys(row["clip"] for row in rows))

    def values(mode: str, key: str, clip: str | None = None) -> np.ndarray:
        return np.array([r[key] for r in rows if r["mode"] == mode and (clip is None or r["clip"] == clip)], float)

    out: dict = {"modes": {}, "per_clip": {}}
    for mode in modes:
        stats = {key: float(np.nanmean(values(mode, key))) for key in (*KEYS, "dit_cpu_ms_per_frame")}
        if mode != "offline":
            hop, lookahead = (int(v) for v in mode.split(":")[:2])
            stats["first_frame_audio_ms"] = 1000 * (hop + lookahead) / 25 + 2.5
        else:
            stats["first_frame_audio_ms"] = 1000 * window / 25 + 2.5
        out["modes"][mode] = stats
        out["per_clip"][mode] = {
            clip: {key: [float(np.nanmin(values(mode, key, clip))), float(np.nanmax(values(mode, key, clip)))]
                   for key in ("mouth_r", "mouth_std", "yaw_lag1_autocorr")}
            for clip in clips
        }  # fmt: skip
    offline = out["modes"]["offline"]
    for stats in out["modes"].values():
        stats["mouth_r_ratio"] = stats["mouth_r"] / offline["mouth_r"]
        stats["mouth_std_ratio"] = stats["mouth_std"] / offline["mouth_std"]
        stats["yaw_autocorr_diff"] = stats["yaw_lag1_autocorr"] - offline["yaw_lag1_autocorr"]
    # Offline's own spread: per clip, the range over seeds of the mean measure (what a re-run with another seed moves).
    spread = {}
    for key in ("mouth_r", "mouth_std", "yaw_lag1_autocorr"):
        per_seed: dict[int, list[float]] = {}
        for row in rows:
            if row["mode"] == "offline":
                per_seed.setdefault(row["seed"], []).append(row[key])
        means = [float(np.nanmean(v)) for v in per_seed.values()]
        spread[key] = [min(means), max(means)]
    out["offline_seed_range"] = spread
    return out


def print_table(summary: dict) -> None:
    print(
        "\n| mode (hop:lookahead) | first frame after (audio) | DiT CPU ms/frame | mouth r | opening std "
        "| yaw lag-1 autocorr | sharpness | r vs offline | std vs offline | autocorr - offline |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, s in summary["modes"].items():
        print(f"| {mode} | {s['first_frame_audio_ms']:.1f} ms | {s['dit_cpu_ms_per_frame']:.1f} | {s['mouth_r']:.3f} "
              f"| {s['mouth_std']:.4f} | {s['yaw_lag1_autocorr']:+.3f} | {s['sharpness_ratio']:.3f} "
              f"| {s['mouth_r_ratio']:.3f} | {s['mouth_std_ratio']:.3f} | {s['yaw_autocorr_diff']:+.3f} |")  # fmt: skip
    print(f"\noffline's range over seeds (mean over clips): {summary['offline_seed_range']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--bundle", type=Path, default=Path("data/bundle"))
    parser.add_argument("--sample", type=Path, default=Path("data/sample"), help="the sample corpus (index.json)")
    parser.add_argument("--configs", nargs="*", default=None,
                        help="HOP:LOOKAHEAD[:STEPS] frames (and DDIM steps); default params' generate.stream_hop:"
                             "stream_lookahead:stream_steps")  # fmt: skip
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--overlap",
        type=int,
        default=None,
        help="shown frames held inside each streaming window (default params' generate.stream_overlap)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/stream_quality"), help="portraits are written here")
    parser.add_argument("--json", type=Path, default=None, help="rows and summary written here")
    args = parser.parse_args(argv)
    limit_threads(args.threads)
    params = load_params(args.params)
    bundle = load_bundle(args.bundle)
    gen = params.generate
    default = f"{gen.stream_hop}:{gen.stream_lookahead}" + (f":{gen.stream_steps}" if gen.stream_steps else "")
    configs: list[tuple[int, int, int | None] | None] = [None]
    for config in args.configs or [default]:
        hop, lookahead, *steps = (int(v) for v in config.split(":"))
        configs.append((hop, lookahead, steps[0] if steps else None))
    overlap = gen.stream_overlap if args.overlap is None else args.overlap
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"# bundle {bundle.sha256[:16]} (W {bundle.dit.window}, K {bundle.dit.context}, "
          f"{bundle.meta['sampling']['steps']} steps), configs {configs}, overlap {overlap}, "
          f"seeds {args.seeds}")  # fmt: skip
    rows = []
    for clip in pick_clips(args.sample):
        rows += run_clip(bundle, params, clip, args.sample, configs, args.seeds, args.work, overlap)
    summary = summarise(rows, bundle.dit.window)
    print_table(summary)
    result = {"bundle_sha256": bundle.sha256, "seeds": args.seeds, "rows": rows, **summary}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
