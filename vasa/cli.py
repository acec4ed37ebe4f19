"""`vasa`: one subcommand per pipeline stage. Thin shells: parse arguments, load params.yaml, call
the library. DVC stages run them as `python -m vasa.cli <stage> ...` with every path explicit.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from vasa.config import ConfigError, Params, load_params
from vasa.errors import InputError

Handler = Callable[[argparse.Namespace, Params], int]


def _sample(args: argparse.Namespace, params: Params) -> int:
    from preprocessing.sample.corpus import write_corpus

    clips = write_corpus(params.sample, args.out)
    seconds = sum(clip["duration_s"] for clip in clips)
    print(f"sample corpus: {len(clips)} clips, {seconds:.1f} s of video in {args.out}")
    return 0


def _add_sample(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "sample",
        help="write the embedded synthetic talking-face corpus",
        description=(
            "Synthesise the embedded sample corpus: public-domain portraits bundled in installed "
            "packages, animated (jaw following espeak-ng speech, blinks, 3D head motion) and written "
            "as 25 fps H.264 + 16 kHz AAC mp4 with a provenance JSON per clip and an index.json. "
            "Reads params section `sample`. Same params give byte-identical files; clips already "
            "present with matching sha256 and params are kept, so an interrupted run resumes."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    parser.set_defaults(handler=_sample)
    return parser


def _ingest(args: argparse.Namespace, params: Params) -> int:
    from flows.ingest import run

    run(
        params.ingest,
        args.out,
        sample_dir=args.sample_dir,
        local_dir=args.local_dir,
        local_csv=args.local_csv,
        voxceleb_dirs=args.voxceleb_dir,
        downloads_dir=args.downloads,
    )
    return 0


def _add_ingest(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "ingest",
        help="turn the configured sources into media files plus one provenance manifest",
        description=(
            "Run the Prefect flow `ingest` (flows/ingest.py): read every source named in params "
            "`ingest.sources` (sample, local, voxceleb2, youtube), download and extract archives "
            "(resumable, verified, zip-slip safe; credentials from the environment variables named in "
            "params), and write OUT/manifest.parquet: one row per clip with speaker, source, licence, "
            "sha256, duration, fps, split and status. Bad inputs become rows with a status and a reason; "
            "re-running adds new clips and keeps the ones already ingested."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder: manifest.parquet, extracted media")
    parser.add_argument("--sample-dir", type=Path, help="the embedded sample corpus (source `sample`)")
    parser.add_argument("--local-dir", type=Path, help="folder of talking-head videos (source `local`)")
    parser.add_argument("--local-csv", type=Path, help="CSV with per-file speaker id, licence, source URL")
    parser.add_argument(
        "--voxceleb-dir",
        type=Path,
        action="append",
        default=[],
        help="an already extracted VoxCeleb2 tree (repeatable; sources `voxceleb2` and `youtube`)",
    )
    parser.add_argument(
        "--downloads",
        type=Path,
        help="where archive parts and YouTube videos go (default OUT/downloads); partial downloads resume",
    )
    parser.set_defaults(handler=_ingest)
    return parser


def _preprocess(args: argparse.Namespace, params: Params) -> int:
    from flows.preprocess import run

    summary = run(params.preprocess, args.manifest, args.out, args.cache, allow_empty=args.allow_empty)
    print(f"preprocess: {summary['processed']} clips processed, {summary['cached']} from the cache")
    return 0


def _add_preprocess(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "preprocess",
        help="manifest -> webdataset shards of face crops, pose, gaze and audio features",
        description=(
            "Run the Prefect flow `preprocess` (flows/preprocess.py) over every ok clip of the manifest: "
            "decode at a constant 25 fps and 16 kHz mono, track the face with MediaPipe FaceMesh, split "
            "on no/multiple/small faces and track jumps, make a stable aligned crop, estimate 3D head pose, "
            "gaze and an expression descriptor, compute log-mel features aligned to the frames, apply "
            "quality filters, and write webdataset shards per split with per-shard stats, index.json and "
            "failures.parquet, joining each clip's provenance from the manifest. Runs on threads, processes "
            "or Dask (params `preprocess.runner`); finished clips are cached so a killed or extended run "
            "resumes. A missing manifest, or a run that would leave no samples, exits 2 and changes nothing; "
            "only files listed in OUT's previous index.json are ever removed."
        ),
    )
    parser.add_argument("--manifest", type=Path, required=True, help="the ingest manifest (manifest.parquet)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for shards, stats, index")
    parser.add_argument("--cache", type=Path, required=True, help="per-clip cache (keep it between runs)")
    parser.add_argument(
        "--allow-empty",
        action="store_true",
        help="write an output with zero samples (by default such a run fails and leaves OUT untouched)",
    )
    parser.set_defaults(handler=_preprocess)
    return parser


def _train_latent(args: argparse.Namespace, params: Params) -> int:
    from vasa.train_latent import deepspeed_config, run

    result = run(
        params.train_latent,
        args.shards,
        args.out,
        resume=args.resume,
        deepspeed=deepspeed_config(args.deepspeed),
        progress=not args.no_progress,
    )
    margins = {k: round(v, 2) for k, v in result.evaluation.items() if k.endswith("margin_db")}
    print(f"train-latent: {result.step} steps, EMA weights in {result.layout.model}; held-out margin (dB): {margins}")
    return 0


def _add_train_latent(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "train-latent",
        help="stage 1: train the disentangled face latent space on the shards",
        description=(
            "Train the stage-1 face latent model (VASA-1 §3.1; preset in params `train_latent.model`) on "
            "source/driver frame pairs and cross-identity frames from the train split of the shards, with the "
            "shared engine (Accelerate; DeepSpeed with --deepspeed). Writes OUT/model (EMA weights as "
            "safetensors + model.json with preset, params, step and the shards' lineage), OUT/live (DVCLive "
            "metrics, including held-out PSNR against the copy-the-source baseline), OUT/images (PNG grids) and "
            "OUT/checkpoints (resumable states: --resume). Multi-process and multi-node launch commands: "
            "vasa/train_latent.py and cluster/README.md."
        ),
    )
    parser.add_argument("--shards", type=Path, required=True, help="preprocess output folder (index.json + shards)")
    parser.add_argument("--out", type=Path, required=True, help="run folder: model/, live/, images/, checkpoints/")
    parser.add_argument("--resume", action="store_true", help="continue from the latest state in OUT/checkpoints")
    parser.add_argument(
        "--deepspeed",
        type=Path,
        help="DeepSpeed JSON (cluster/deepspeed/zero2.json or zero3.json); default: the file named by "
        "ACCELERATE_DEEPSPEED_CONFIG_FILE when `accelerate launch` was given a DeepSpeed config",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.set_defaults(handler=_train_latent)
    return parser


def _extract_motion(args: argparse.Namespace, params: Params) -> int:
    from vasa.motion_data import extract

    counts = extract(params.extract_motion, args.shards, args.latent, args.out, progress=not args.no_progress)
    print(
        f"extract-motion: {counts['redone']} shards encoded, {counts['kept']} unchanged, "
        f"{counts['samples']} samples, {counts['failed']} left out; motion shards in {args.out}"
    )
    return 0


def _add_extract_motion(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "extract-motion",
        help="stage 2 data: the stage-1 motion encoder over every shard sample -> motion shards",
        description=(
            "Run the trained stage-1 motion encoder (EMA weights from LATENT/model, safetensors) over every "
            "sample of the shards (batched, on the GPU when there is one) and write motion shards with the same "
            "shard names and keys: per frame [pose, z_dyn], the log-mel of each video frame, gaze, head distance, "
            "an emotion descriptor and the sample's JSON with its provenance; plus index.json and stats.json "
            "(mean/std per dimension over the train split). Only input shards whose digest (shard bytes, "
            "stage-1 weights, code, settings) changed are re-encoded. Reads params `extract_motion`."
        ),
    )
    parser.add_argument("--shards", type=Path, required=True, help="preprocess output folder (index.json + shards)")
    parser.add_argument("--latent", type=Path, required=True, help="stage-1 model folder (train-latent OUT/model)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for motion shards, index, stats")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.set_defaults(handler=_extract_motion)
    return parser


def _train_motion(args: argparse.Namespace, params: Params) -> int:
    from vasa.train_latent import deepspeed_config
    from vasa.train_motion import run

    result = run(
        params.train_motion,
        args.motion,
        args.out,
        resume=args.resume,
        deepspeed=deepspeed_config(args.deepspeed),
        progress=not args.no_progress,
    )
    margin = {k: round(v, 3) for k, v in result.evaluation.items() if k.endswith("margin")}
    print(f"train-motion: {result.step} steps, EMA weights in {result.layout.model}; mouth/audio margin: {margin}")
    return 0


def _add_train_motion(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "train-motion",
        help="stage 2: train the audio-conditioned motion diffusion transformer on the motion shards",
        description=(
            "Train the motion DiT (VASA-1 §3.2; preset in params `train_motion.model`) on windows of W frames "
            "with K context frames from the train split of the motion shards, with the shared engine "
            "(Accelerate; DeepSpeed with --deepspeed). Writes OUT/model (EMA weights as safetensors + model.json "
            "with preset, params, step, the lineage of the motion shards and stage-1 weights, and the "
            "normalisation statistics), OUT/live (DVCLive metrics: loss by noise level, held-out x0 loss, "
            "mouth/audio correlation), OUT/images (generated vs real curves) and OUT/checkpoints (--resume)."
        ),
    )
    parser.add_argument("--motion", type=Path, required=True, help="extract-motion output folder")
    parser.add_argument("--out", type=Path, required=True, help="run folder: model/, live/, images/, checkpoints/")
    parser.add_argument("--resume", action="store_true", help="continue from the latest state in OUT/checkpoints")
    parser.add_argument("--deepspeed", type=Path, help="DeepSpeed JSON (cluster/deepspeed/zero2.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.set_defaults(handler=_train_motion)
    return parser


STAGES = (
    _add_sample,
    _add_ingest,
    _add_preprocess,
    _add_train_latent,
    _add_extract_motion,
    _add_train_motion,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vasa",
        description=(
            "vasa-pipeline: data and training pipeline for audio-driven talking faces. Each "
            "subcommand is one pipeline stage (see docs/ARCHITECTURE.md); `dvc repro` runs them in order."
        ),
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(title="stages", dest="stage", metavar="STAGE", required=True)
    for add in STAGES:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Prefect's local server otherwise tries to send usage telemetry, which fails (and logs an
    # error) on machines without internet access. A user's own setting wins.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Prefect's API calls, one line each
    try:
        params = load_params(args.params)
    except ConfigError as err:
        print(f"vasa: {err}", file=sys.stderr)
        return 2
    handler: Handler = args.handler
    try:
        return handler(args, params)
    except InputError as err:
        print(f"vasa {args.stage}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
