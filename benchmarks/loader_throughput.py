"""Do the training loaders feed a GPU, in bounded memory? Stage-1 pairs at 512² and stage-2 windows, per CPU-s.

    python benchmarks/loader_throughput.py --json OUT.json                 # shards built from ../shared/fixtures
    python benchmarks/loader_throughput.py --json OUT.json --work runs/loader --motion data/motion

Stage 1: the real fixture videos go through the project's own `vasa ingest` (source `local`: one speaker per
file) and `vasa preprocess` at `--crop-size` (512: VoxCeleb2's recipe) into OUT's work folder (kept, reused
on the next run). Then, each in a fresh process (a loader worker's conditions: one thread, its own RSS):
  needed   vasa.loaders.pairs.PairStream, the shipped loader: each clip's pairs and spare frames drawn first,
           only those frames decoded (decoding stops after the last), a buffer of pairs
  whole    the loader before it (the baseline, re-created here): every clip decoded whole and resized, a
           shuffle buffer of decoded clips plus as many evicted ones for the cross-identity frames
both with the recipe's stage-1 data settings (cluster/recipes/voxceleb2_512_8gpu.yaml over params.yaml) at
the `base` preset's resolution. Reported: samples per CPU-s (after the buffer's warm-up) and the process's
peak RSS (what one DataLoader worker holds). Stage 2 (`stage2`; alone with --stage2-only): windows per CPU-s of
vasa.loaders.motion's `ArrayWindows` against the shard reader it replaced, on a motion folder (`--motion`, default
the checkout's data/motion from `dvc repro`), and on synthetic arrays at the recipe's sizes.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's vasa, not another one installed in the venv
RECIPE = ROOT / "cluster" / "recipes" / "voxceleb2_512_8gpu.yaml"


def build_shards(work: Path, fixtures: Path, crop_size: int) -> Path:
    """Fixture videos -> `vasa ingest` (local) -> `vasa preprocess` at crop_size; reused when already built."""
    shards = work / "shards"
    if (shards / "index.json").exists():
        return shards
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"]["sources"] = ["local"]
    params["preprocess"]["crop_size"] = crop_size
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cli = [sys.executable, "-m", "vasa.cli", "--params", str(work / "params.yaml")]
    subprocess.run([*cli, "ingest", "--local-dir", str(fixtures), "--out", str(work / "ingest")], check=True, cwd=ROOT)
    subprocess.run([*cli, "preprocess", "--manifest", str(work / "ingest" / "manifest.parquet"), "--out", str(shards),
                    "--cache", str(work / "cache")], check=True, cwd=ROOT)  # fmt: skip
    return shards


def recipe_data() -> dict:
    """Stage-1 data settings: params.yaml's with the recipe's over them."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())["train_latent"]["data"]
    return data | yaml.safe_load(RECIPE.read_text())["train_latent"]["data"]


def whole_clip_stream(shard_set, size: int, cfg, seed: int):
    """The baseline: the stage-1 loader as it was before decoding only the frames it uses."""
    from vasa.loaders.pairs import decode_sample, draw_pair, pair_item, train_frames
    from vasa.loaders.shards import read_samples

    rng = random.Random(f"bench/{seed}")
    speakers = shard_set.speaker_index()
    buffer, evicted = [], deque(maxlen=cfg.shuffle_buffer)
    while True:
        path = shard_set.train[rng.randrange(len(shard_set.train))]
        for sample in read_samples(path):
            clip = decode_sample(sample, size, speakers, shard_set.crop_size)
            if len(buffer) >= cfg.shuffle_buffer:
                evicted.append(buffer.pop(rng.randrange(len(buffer))))
            buffer.append(clip)
            for _ in range(cfg.pairs_per_clip):
                clip = buffer[rng.randrange(len(buffer))]
                others = [c for c in buffer if c.speaker != clip.speaker] or [
                    c for c in evicted if c.speaker != clip.speaker
                ]
                pair = draw_pair(rng, 0, train_frames(len(clip.frames), cfg.holdout_fraction), cfg.min_frame_gap)
                if pair is not None and others:
                    yield pair_item(rng, clip, *pair, others[rng.randrange(len(others))])


def stage1_child(shards: Path, mode: str, samples: int, resolution: int, changes: dict) -> dict:
    import torch

    from vasa.core.config import LatentDataConfig
    from vasa.loaders.pairs import PairStream, worker_frames
    from vasa.loaders.shards import open_shards

    torch.set_num_threads(1)
    cfg = LatentDataConfig.from_data(recipe_data() | changes | {"workers": 0})
    shard_set = open_shards(shards)
    if mode == "needed":
        stream = iter(PairStream(shard_set, resolution, cfg, seed=0, epoch=0, rank=0, world=1))
    else:
        stream = whole_clip_stream(shard_set, resolution, cfg, seed=0)
    start = time.process_time()
    next(stream)  # the buffer's warm-up
    warm = time.process_time() - start
    start = time.process_time()
    for _ in range(samples):
        next(stream)
    cpu = time.process_time() - start
    return {
        "mode": mode,
        "samples": samples,
        "warmup_cpu_s": round(warm, 2),
        "samples_per_cpu_s": round(samples / cpu, 1),
        "cpu_ms_per_sample": round(1000 * cpu / samples, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "frames_bound": worker_frames(cfg) if mode == "needed" else None,
        "data": cfg.model_dump(mode="json"),
    }


def decode_split(shards: Path, resolution: int, clips: int = 6) -> dict:
    """Per-frame CPU of decoding the crop videos alone and with the RGB conversion + area resize (what
    `decode_frames` pays for every frame and `decode_some` only for the frames it keeps); best of 3."""
    import io

    import av

    from preprocessing import schema
    from vasa.loaders.shards import read_samples

    videos = [s[schema.MP4] for path in sorted(shards.glob("train-*.tar")) for s in read_samples(path)][:clips]

    def per_frame(convert: bool) -> float:
        start, frames = time.process_time(), 0
        for mp4 in videos:
            with av.open(io.BytesIO(mp4)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "SLICE"
                for frame in container.decode(stream):
                    if convert:
                        frame.to_ndarray(width=resolution, height=resolution, format="rgb24", interpolation="AREA")
                    frames += 1
        return 1000 * (time.process_time() - start) / frames

    decode, both = min(per_frame(False) for _ in range(3)), min(per_frame(True) for _ in range(3))
    return {"decode_ms_per_frame": round(decode, 2), "convert_ms_per_frame": round(both - decode, 2),
            "convert_share": round((both - decode) / both, 2)}  # fmt: skip


def stage2(motion: Path, windows: int, work: Path) -> dict:
    """Windows per CPU-s of the stage-2 loader, one process, one thread: the shipped `ArrayWindows` (a batch
    gathered from the memory-mapped train arrays) and the shard reader it replaced (each clip's npy members
    read from its tar and normalised, windows cut one by one and collated; re-created here as the baseline),
    on `motion` at params' W, K and batch; then `ArrayWindows` on synthetic arrays with the recipe's sizes
    (the `base` latent's 263 motion dims, 320 audio dims, W = 100, K = 25, its batch)."""
    import numpy as np
    import torch
    from torch.utils.data import default_collate

    from vasa.core.config import load_params
    from vasa.loaders.motion import (
        ARRAY_MEMBERS,
        ARRAYS_DIR,
        CLIPS_FILE,
        ArrayWindows,
        draw_start,
        open_motion,
        read_clip,
        window_item,
    )
    from vasa.loaders.shards import read_samples

    torch.set_num_threads(1)
    params = load_params(ROOT / "params.yaml")
    cfg, recipe = params.train_motion, yaml.safe_load(RECIPE.read_text())["train_motion"]

    def rate(batches, batch: int) -> float:
        next(batches)
        start, done = time.process_time(), 0
        while done < windows:
            done += len(next(batches)["motion"])
        return round(done / (time.process_time() - start))

    def shard_reader(motion_set, window: int, context: int, batch: int):
        rng = random.Random(0)
        while True:
            path = motion_set.train[rng.randrange(len(motion_set.train))]
            for sample in read_samples(path):
                clip = read_clip(sample, motion_set.stats)
                if len(clip.motion) < window:
                    continue
                items = [window_item(clip, draw_start(rng, len(clip.motion), window, context), window, context)
                         for _ in range(batch)]  # fmt: skip
                yield default_collate(items)

    out: dict = {"window": cfg.window, "context": cfg.context, "batch": cfg.train.batch_size}
    motion_set = open_motion(motion)
    arrays = ArrayWindows(motion, cfg.window, cfg.context, cfg.train.batch_size, 0, 0, 0, 1)
    out["windows_per_cpu_s"] = rate(iter(arrays), cfg.train.batch_size)
    out["shard_reader_windows_per_cpu_s"] = rate(shard_reader(motion_set, cfg.window, cfg.context,
                                                              cfg.train.batch_size), cfg.train.batch_size)  # fmt: skip
    out["speedup_vs_shard_reader"] = round(out["windows_per_cpu_s"] / out["shard_reader_windows_per_cpu_s"], 1)
    # The recipe's sizes on synthetic arrays (2,000 clips of 8 s, written once into the work folder).
    window, context, batch = recipe["window"], recipe["context"], recipe["train"]["batch_size"]
    dims = {"motion": (263,), "audio": (320,), "gaze": (2,), "distance": (1,), "emotion": (2,)}
    root = work / "motion_recipe"
    folder = root / ARRAYS_DIR / "train"
    clips, frames = 2000, 200
    if not (folder / CLIPS_FILE).exists():
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for name in ARRAY_MEMBERS:
            array = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float32,
                                              shape=(clips * frames, *dims[name]))  # fmt: skip
            array[:] = rng.standard_normal(array.shape, dtype=np.float32)
            array.flush()
        np.save(folder / CLIPS_FILE, np.stack([np.arange(clips) * frames, np.full(clips, frames)], 1).astype(np.int64))
    recipe_rate = rate(iter(ArrayWindows(root, window, context, batch, 0, 0, 0, 1)), batch)
    out["recipe"] = {"window": window, "context": context, "batch": batch, "motion_dim": 263, "audio_dim": 320,
                     "windows_per_cpu_s": recipe_rate, "cpu_ms_per_window": round(1000 / recipe_rate, 4)}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="write the figures here")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "loader", help="built shards (kept)")
    parser.add_argument("--fixtures", type=Path, default=ROOT.parent / "shared" / "fixtures")
    parser.add_argument("--crop-size", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=512, help="stage-1 frames (the base preset: 512)")
    parser.add_argument("--samples", type=int, default=300, help="stage-1 samples timed per mode")
    parser.add_argument("--motion", type=Path, default=ROOT / "data" / "motion", help="motion shards for stage 2")
    parser.add_argument("--windows", type=int, default=5000)
    parser.add_argument("--pairs-per-clip", type=int, help="instead of the recipe's train_latent.data value")
    parser.add_argument("--shuffle-buffer", type=int, help="instead of the recipe's train_latent.data value")
    parser.add_argument("--stage2-only", action="store_true", help="only the stage-2 figures (no fixtures needed)")
    parser.add_argument("--child", nargs=2, metavar=("SHARDS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    changes = {key: value for key, value in (("pairs_per_clip", args.pairs_per_clip),
               ("shuffle_buffer", args.shuffle_buffer)) if value is not None}  # fmt: skip
    if args.child:
        print(json.dumps(stage1_child(Path(args.child[0]), args.child[1], args.samples, args.resolution, changes)))
        return
    if args.stage2_only:
        out = {"stage2": stage2(args.motion, args.windows, args.work)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
        return
    if not args.fixtures.is_dir():
        raise SystemExit(f"{args.fixtures}: no fixtures folder (pass --fixtures)")
    shards = build_shards(args.work, args.fixtures, args.crop_size)
    out: dict = {"crop_size": args.crop_size, "resolution": args.resolution}
    for mode in ("whole", "needed"):
        done = subprocess.run(
            [sys.executable, __file__, "--json", "-", "--samples", str(args.samples), "--resolution",
             str(args.resolution), *(f"--{key.replace('_', '-')}={value}" for key, value in changes.items()),
             "--child", str(shards), mode],
            check=True, capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        out[f"stage1_{mode}"] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"stage 1 ({mode}): {out[f'stage1_{mode}']}", flush=True)
    out["decode"] = decode_split(shards, args.resolution)
    print(f"decode: {out['decode']}", flush=True)
    needed, whole = out["stage1_needed"], out["stage1_whole"]
    out["samples_per_cpu_s"] = needed["samples_per_cpu_s"]
    out["peak_rss_mb_per_worker"] = needed["peak_rss_mb"]
    out["speedup_vs_whole"] = round(needed["samples_per_cpu_s"] / whole["samples_per_cpu_s"], 2)
    out["rss_ratio_vs_whole"] = round(needed["peak_rss_mb"] / whole["peak_rss_mb"], 2)
    if (args.motion / "index.json").exists():
        out["stage2"] = stage2(args.motion, args.windows, args.work)
        out["windows_per_cpu_s"] = out["stage2"]["windows_per_cpu_s"]
    else:
        print(f"stage 2 skipped: no motion shards at {args.motion} (run `dvc repro extract_motion`)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
    main()
