"""How the audio guidance scale moves what a viewer sees: offline generation of the demo's held-out sentences
(each clip's first frame as the portrait, its own speech) at several λ_audio, over seeds, measured by the
independent FaceMesh measures (vasa.evaluation.independent) beside the real clips measured the same way.

    python benchmarks/guidance_scan.py --bundle data/bundle --scales 0.5 1.0 1.5 2.0 [--json OUT]

Printed: one row per clip, scale and seed, then per scale the means over clips and seeds (mouth r with the
loudness, opening std and its ratio to the real clips', yaw-change autocorrelation, sharpness). Classifier-free
guidance (VASA-1 §3.2) extrapolates away from the unconditional motion: a larger λ_audio widens the mouth's
movement with the speech; the scale whose opening amplitude matches the real clips' is the one to ship
(docs/BENCHMARKS.md "Audio guidance").
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from learning_proof import first_per_speaker, sample_records
from stream_quality import CHUNK_S, clip_session

from vasa.core.config import load_params
from vasa.evaluation.independent import measure_video
from vasa.inference.bundle import load_bundle
from vasa.inference.generate import chunks, conditions_for, limit_threads, stream
from vasa.stages.demo import pick_clips

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("mouth_r", "mouth_std", "yaw_lag1_autocorr", "sharpness_ratio")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--bundle", type=Path, default=ROOT / "data" / "bundle")
    parser.add_argument("--sample", type=Path, default=ROOT / "data" / "sample", help="the sample corpus")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=Path("/tmp/vasa-guidance-scan"), help="portraits go here")
    parser.add_argument("--json", type=Path, help="rows and summary written here")
    parser.add_argument("--split", choices=("test", "train"), default="test",
                        help="the demo's held-out clips (default), or each speaker's first train clip: a scale "
                        "chosen there has not seen the sentences it is then judged on")  # fmt: skip
    args = parser.parse_args(argv)
    limit_threads(1)
    params = load_params(args.params)
    bundle = load_bundle(args.bundle)
    rate, fps = bundle.meta["audio"]["sample_rate"], bundle.meta["fps"]
    args.work.mkdir(parents=True, exist_ok=True)
    rows, real = [], []
    clips = pick_clips(args.sample) if args.split == "test" else first_per_speaker(sample_records(args.sample, "train"))
    for clip in clips:
        frames, speech, portrait, session = clip_session(bundle, params, args.sample / clip["file"], args.work)
        seen = measure_video(frames, speech, fps, frames[0], params.preprocess.face, sample_rate=rate)
        real.append({"clip": clip["clip_id"], **{key: float(seen[key]) for key in KEYS}})
        print(json.dumps({"real": True, **real[-1]}), flush=True)
        for scale in args.scales:
            for seed in args.seeds:
                conditions = replace(conditions_for(portrait, bundle, params.generate, seed=seed), cfg_audio=scale)
                made = np.concatenate(list(stream(session, chunks(speech, int(rate * CHUNK_S)), conditions)))
                seen = measure_video(made, speech, fps, frames[0], params.preprocess.face, sample_rate=rate)
                rows.append({"clip": clip["clip_id"], "cfg_audio": scale, "seed": seed,
                             **{key: float(seen[key]) for key in KEYS}})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    real_std = float(np.mean([r["mouth_std"] for r in real]))
    summary = {"real": {key: float(np.mean([r[key] for r in real])) for key in KEYS}, "scales": {}}
    print("\nreal clips: " + ", ".join(f"{key} {summary['real'][key]:.3f}" for key in KEYS))
    print("| λ_audio | mouth r | opening std (/ real) | yaw autocorr. | sharpness |")
    for scale in args.scales:
        chosen = [r for r in rows if r["cfg_audio"] == scale]
        means = {key: float(np.nanmean([r[key] for r in chosen])) for key in KEYS}
        summary["scales"][str(scale)] = means
        print(f"| {scale} | {means['mouth_r']:.3f} | {means['mouth_std']:.3f} ({means['mouth_std'] / real_std:.2f}) "
              f"| {means['yaw_lag1_autocorr']:+.3f} | {means['sharpness_ratio']:.3f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"bundle_sha256": bundle.sha256, "rows": rows, "real_rows": real,
                                         **summary}, indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
