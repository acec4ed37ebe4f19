"""`vasa`: one subcommand per pipeline stage. Thin shells: parse arguments, load params.yaml, call
the library. DVC stages run them as `python -m vasa.cli <stage> ...` with every path explicit.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from vasa.core.config import ConfigError, GenerateConfig, Params, load_params
from vasa.core.errors import InputError

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


def _write_metrics(path: Path | None, counts: dict) -> None:
    """A stage's counts as a small JSON (DVC `metrics`): functions of the inputs only, so re-runs agree."""
    if path is not None:
        from vasa.core.files import write_json

        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, counts)


def _add_metrics_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--metrics", type=Path, help=f"also write {what} to this JSON file (DVC metrics)")


def _ingest(args: argparse.Namespace, params: Params) -> int:
    from flows.ingest import run

    counts = run(
        params.ingest,
        args.out,
        sample_dir=args.sample_dir,
        local_dir=args.local_dir,
        local_csv=args.local_csv,
        voxceleb_dirs=args.voxceleb_dir,
        downloads_dir=args.downloads,
        denylist_path=args.denylist,
        hdtf_dir=args.hdtf_dir,
        celebvhq_json=args.celebvhq_json,
        talkvid_json=args.talkvid_json,
    )
    _write_metrics(args.metrics, {"clips": sum(counts.values()), "clips_by_status": counts})
    return 0


def _add_ingest(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "ingest",
        help="turn the configured sources into media files plus one provenance manifest",
        description=(
            "Run the Prefect flow `ingest` (flows/ingest.py): read every source named in params "
            "`ingest.sources` (sample, local, voxceleb2, youtube, hdtf, celebvhq, talkvid), download and "
            "extract archives (resumable, verified, zip-slip safe; credentials from the environment variables named in "
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
    parser.add_argument("--hdtf-dir", type=Path, help="HDTF_dataset/ of github.com/MRzzm/HDTF (source `hdtf`)")
    parser.add_argument("--celebvhq-json", type=Path, help="CelebV-HQ's celebvhq_info.json (source `celebvhq`)")
    parser.add_argument(
        "--talkvid-json",
        type=Path,
        action="append",
        default=[],
        help="a TalkVid metadata JSON (repeatable; source `talkvid`)",
    )
    parser.add_argument(
        "--downloads",
        type=Path,
        help="where archive parts and YouTube videos go (default OUT/downloads); partial downloads resume",
    )
    _add_denylist_option(parser, "rows it covers get status taken_down and are never probed or downloaded")
    _add_metrics_option(parser, "the manifest's clip counts by status")
    parser.set_defaults(handler=_ingest)
    return parser


def _preprocess(args: argparse.Namespace, params: Params) -> int:
    from preprocessing.survey import nothing_to_do
    from preprocessing.writer import require_manifest

    options = {"allow_empty": args.allow_empty, "denylist_path": args.denylist}
    require_manifest(args.manifest)
    summary = nothing_to_do(params.preprocess, args.manifest, args.out, args.cache, **options)
    if summary is None:  # work to do: only now import Prefect and start the flow
        from flows.preprocess import run_flow

        summary = run_flow(params.preprocess, args.manifest, args.out, args.cache, **options)
    print(
        f"preprocess: {summary['processed']} clips processed, {summary['cached']} from the cache, "
        f"{summary['assembled']} shards written"
    )
    splits = summary["splits"]
    counts = {
        "samples_by_split": {split: block["samples"] for split, block in splits.items()},
        "frames_by_split": {split: block["frames"] for split, block in splits.items()},
        "shards_by_split": {split: len(block["shards"]) for split, block in splits.items()},
        "failures_by_reason": summary["failures_by_reason"],
    }
    _write_metrics(args.metrics, counts)
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
    _add_denylist_option(parser, "clips it covers are left out (reason taken_down) and their cache entries removed")
    _add_metrics_option(parser, "samples, frames and shards by split and clips left out by reason")
    parser.set_defaults(handler=_preprocess)
    return parser


def _add_denylist_option(parser: argparse.ArgumentParser, effect: str) -> None:
    from preprocessing.denylist import DEFAULT_PATH

    parser.add_argument(
        "--denylist", type=Path, default=DEFAULT_PATH, help=f"takedown denylist CSV (default %(default)s): {effect}"
    )


def _takedown(args: argparse.Namespace, params: Params) -> int:
    import datetime

    from preprocessing import denylist

    kind, value = next((k, getattr(args, k)) for k in denylist.KINDS if getattr(args, k) is not None)
    date = args.date or datetime.datetime.now(datetime.UTC).date().isoformat()  # the request's record date
    request = denylist.Request(kind, value, args.reason, date)
    added = denylist.add(args.denylist, request)
    print(f"takedown of {kind} {value}: {'recorded in' if added else 'already in'} {args.denylist}")
    return 0


def _add_takedown(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "takedown",
        help="record a takedown request (speaker, video or clip) in the denylist",
        description=(
            "Add one request to the takedown denylist (preprocessing/denylist.py), a versioned CSV that "
            "stages `ingest` and `preprocess` depend on: the next `dvc repro` marks the covered manifest rows "
            "taken_down, leaves them out of every shard and removes their cached outcomes."
        ),
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--speaker", help="speaker id (manifest speaker_id)")
    what.add_argument("--video", help="YouTube id (or source URL of a clip without one)")
    what.add_argument("--clip", help="clip id (manifest clip_id)")
    parser.add_argument("--reason", required=True, help="why (free text, e.g. who asked and when)")
    parser.add_argument("--date", help="day the request was recorded, YYYY-MM-DD (default: today, UTC)")
    _add_denylist_option(parser, "the request is added to it (created if missing)")
    parser.set_defaults(handler=_takedown)
    return parser


def _pin_shards(args: argparse.Namespace, params: Params) -> int:
    from preprocessing import writer

    out = args.out or params.preprocess.shards.pin
    if not out:
        raise InputError("no pin file: pass --out, or set preprocess.shards.pin in params")
    if args.max_generations < 0:
        raise InputError(f"--max-generations must be 0 (no limit) or more, not {args.max_generations}")
    pin, before, folded = writer.pin_manifest(Path(out), args.manifest, args.compact, args.max_generations)
    added, dropped = len(pin.keys() - before.keys()), len(before.keys() - pin.keys())
    generations = len(set(pin.values()))
    if folded:
        print(f"pin-shards: generations {', '.join(map(str, reversed(folded)))} folded into generation {folded[-1]}")
    print(
        f"pin-shards: {len(pin)} clips in {generations} generation(s) in {out}: {added} newly pinned, "
        f"{dropped} no longer in the manifest{' (compacted)' if args.compact else ''}"
    )
    return 0


def _add_pin_shards(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "pin-shards",
        help="pin the shard layout: clips added later write new shards and rewrite no pinned one",
        description=(
            "Update the pin file (params preprocess.shards.pin) from MANIFEST's usable clips: pinned clips keep "
            "their generation, the others are pinned as the next one (their shards already carry it, so "
            "nothing moves). Each generation is its own key-range trie, so the clips of a later week only "
            "write shards of their own generation (`<split>-g<N>_<prefix>-<part>`). --compact puts every clip "
            "in generation 0: one trie again, rewriting the shards whose key ranges gained clips "
            "(preprocessing/shards.py)."
        ),
    )
    parser.add_argument("--manifest", type=Path, default=Path("data/ingest/manifest.parquet"), help="ingest manifest")
    parser.add_argument("--out", type=Path, help="pin file to update (default: params preprocess.shards.pin)")
    parser.add_argument("--compact", action="store_true", help="every clip in generation 0 (one trie)")
    parser.add_argument(
        "--max-generations",
        type=int,
        default=0,
        metavar="N",
        help="then fold the newest generations into one until at most N are left, size-tiered (0: no limit; "
        "scheduled retraining uses params retrain.max_shard_generations)",
    )
    parser.set_defaults(handler=_pin_shards)
    return parser


def deepspeed_config(path: Path | None) -> dict | None:
    """The DeepSpeed JSON named on the command line, or by `accelerate launch --config_file` with a
    DeepSpeed section (it exports ACCELERATE_DEEPSPEED_CONFIG_FILE)."""
    named = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    path = path or (Path(named) if named else None)
    return None if path is None else json.loads(path.read_text())


def _train_latent(args: argparse.Namespace, params: Params) -> int:
    from vasa.stages.train_latent import run

    result = run(
        params.train_latent,
        args.shards,
        args.out,
        scores=args.scores,
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
            "vasa/stages/train_latent.py and cluster/README.md."
        ),
    )
    parser.add_argument("--shards", type=Path, required=True, help="preprocess output folder (index.json + shards)")
    parser.add_argument("--out", type=Path, required=True, help="run folder: model/, live/, images/, checkpoints/")
    _add_scores_option(parser, "its rejected train clips are not trained on")
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
    from vasa.stages.extract_motion import extract

    counts = extract(
        params.extract_motion, args.shards, args.latent, args.out, scores=args.scores, progress=not args.no_progress
    )
    print(
        f"extract-motion: {counts['redone']} shards encoded, {counts['kept']} unchanged, "
        f"{counts['samples']} samples, {counts['failed']} left out, {counts['filtered']} filtered by the scores, "
        f"{counts['realigned']} re-aligned; motion shards in {args.out}"
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
    _add_scores_option(parser, "rejected train clips are left out, corrected offsets re-align the audio")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.set_defaults(handler=_extract_motion)
    return parser


def _train_motion(args: argparse.Namespace, params: Params) -> int:
    from vasa.stages.train_motion import run

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


def _export(args: argparse.Namespace, params: Params) -> int:
    from vasa.stages.export import export

    digest = export(params, args.latent, args.motion_dit, args.out, dvc_lock=args.dvc_lock, onnx=params.export.onnx)
    print(f"export: bundle {digest[:12]} in {args.out}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "export",
        help="bundle the trained stages into one real-time checkpoint folder",
        description=(
            "Write the self-describing bundle (vasa/inference/bundle.py): EMA weights of the stage-1 face "
            "latent model and the stage-2 motion DiT as safetensors, and model.json with presets, audio-feature "
            "settings, crop geometry, motion normalisation, sampling/guidance defaults and lineage. Refuses a "
            "motion model trained on another stage-1 model's motion."
        ),
    )
    parser.add_argument("--latent", type=Path, required=True, help="stage-1 model folder (train-latent OUT/model)")
    parser.add_argument("--motion-dit", type=Path, required=True, help="stage-2 model folder (train-motion OUT/model)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder (created)")
    parser.add_argument(
        "--dvc-lock", type=Path, default=Path("dvc.lock"), help="upstream digests (default: %(default)s)"
    )
    parser.set_defaults(handler=_export)
    return parser


def _finite(text: str) -> float:
    """A float option: nan and inf are refused while parsing (their ranges are checked by the library)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _pair(text: str) -> tuple[float, float]:
    try:
        theta, phi = (_finite(v) for v in text.split(","))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected THETA,PHI in finite degrees, got {text!r}") from None
    return theta, phi


def _floats(text: str) -> list[float]:
    try:
        return [_finite(v) for v in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}") from None


# `vasa generate`'s options that set a condition or sampling setting (vasa.inference.generate.condition_ranges)
GENERATE_OVERRIDES = ("gaze", "distance", "emotion", "cfg_audio", "cfg_gaze", "steps", "seed")


def _generate(args: argparse.Namespace, params: Params) -> int:
    from vasa.inference.bundle import load_bundle
    from vasa.inference.generate import check_request, generate_file, resolve_device
    from vasa.labelling.labels import KEY_PASSWORD_ENV

    cfg = _generate_config(args, params)
    overrides = {key: getattr(args, key) for key in GENERATE_OVERRIDES}
    inputs = {"--image": args.image, "--audio": args.audio, "--driving-video": args.driving_video,
              "--pose-from": args.pose_from, "--dynamics-from": args.dynamics_from}  # fmt: skip
    names = {key: "--" + key.replace("_", "-") for key in overrides}
    # Before the bundle is loaded (seconds) and any work: the output, the input files, the options' ranges.
    check_request(args.out, inputs, overrides, cfg, names=names)
    device = resolve_device(cfg.device)
    _set_threads(cfg.threads)
    bundle = load_bundle(args.bundle, device)
    result = generate_file(
        bundle, args.image, args.audio, args.out, cfg, params.preprocess.face,
        crop_only=args.crop_only, driving_video=args.driving_video, pose_from=args.pose_from,
        dynamics_from=args.dynamics_from, key_password=os.environ.get(KEY_PASSWORD_ENV), names=names, **overrides,
    )  # fmt: skip
    print(
        f"generate: {result.path} ({result.frames} frames, {result.seconds:.2f} s), bundle {result.bundle_sha256[:12]}"
    )  # noqa: E501
    return 0


def _generate_config(args: argparse.Namespace, params: Params) -> GenerateConfig:
    """params `generate` with the command line's --device, when given."""
    if args.device is None:
        return params.generate
    return params.generate.model_copy(update={"device": args.device})


def _set_threads(threads: int) -> None:
    """Generation's threads (params generate.threads: torch, OpenCV, BLAS pools): set here, by the entry point, so
    the library never reads the environment or changes a caller's settings."""
    from vasa.inference.generate import limit_threads

    limit_threads(threads)


def _add_generate(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "generate",
        help="portrait + speech -> talking-face mp4 (labelled as AI-generated)",
        description=(
            "Animate a portrait (jpg/png/webp/...) with speech (wav/mp3/m4a/flac/...): the motion DiT generates "
            "head pose and facial dynamics window by window, the stage-1 renderer draws each frame, which is "
            "pasted back into the portrait (unless --crop-only) and muxed with the original audio. The video is "
            "labelled: container tags, an invisible watermark and a C2PA manifest (params generate.c2pa)."
        ),
    )
    parser.add_argument("--bundle", type=Path, required=True, help="export output folder")
    parser.add_argument("--image", type=Path, required=True, help="portrait image")
    parser.add_argument("--audio", type=Path, required=True, help="speech audio (any format PyAV reads)")
    parser.add_argument("--out", type=Path, required=True, help="output .mp4")
    parser.add_argument("--gaze", type=_pair, help="main gaze THETA,PHI in degrees (default: the portrait's)")
    parser.add_argument("--distance", type=_finite, help="head distance log(crop/scale) (default: the portrait's)")
    parser.add_argument("--emotion", type=_floats, help="emotion offset: smile,brow_raise (default: the portrait's)")
    parser.add_argument("--cfg-audio", type=_finite, help="audio guidance scale (default: the bundle's)")
    parser.add_argument("--cfg-gaze", type=_finite, help="gaze guidance scale (default: the bundle's)")
    parser.add_argument("--steps", type=int, help="DDIM steps per window (default: params or the bundle's)")
    parser.add_argument("--seed", type=int, help="sampling seed (default: params generate.seed)")
    parser.add_argument("--crop-only", action="store_true", help="write the face crop, not the pasted-back portrait")
    parser.add_argument("--driving-video", type=Path, help="reenactment: pose and dynamics from this video")
    parser.add_argument("--pose-from", type=Path, help="head pose from this video, dynamics generated")
    parser.add_argument("--dynamics-from", type=Path, help="facial dynamics from this video, pose generated")
    _add_device(parser)
    parser.set_defaults(handler=_generate)
    return parser


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda", "mps"),
        help="where the models run (default: params generate.device); auto = cuda, else mps, else cpu",
    )  # fmt: skip


def _verify(args: argparse.Namespace, params: Params) -> int:
    from vasa.labelling.verify import verify_file

    report = verify_file(args.video, max_frames=args.max_frames)
    print(json.dumps(report, indent=2))
    return 0 if report["labelled"] else 1


def _add_verify(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "verify",
        help="report a video's AI-generated labels: container tags, C2PA manifest, watermark",
        description="Print the three labelling layers as JSON; exit status 0 if any says AI-generated, 1 if none.",
    )
    parser.add_argument("video", type=Path)
    parser.add_argument("--max-frames", type=int, help="watermark: read at most this many frames")
    parser.set_defaults(handler=_verify)
    return parser


def _demo(args: argparse.Namespace, params: Params) -> int:
    from vasa.labelling.labels import KEY_PASSWORD_ENV
    from vasa.stages.demo import run_demo

    _set_threads(params.generate.threads)
    report = run_demo(params, args.sample, args.bundle, args.out, args.report, os.environ.get(KEY_PASSWORD_ENV))
    print(f"demo: {len(report['videos'])} videos in {args.out}; every check passed: {report['all_ok']}")
    return 0 if report["all_ok"] else 1


def _add_demo(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "demo",
        help="animate each sample-corpus speaker's held-out clip (its first frame, its speech) and check the videos",
        description=(
            "For each speaker of the sample corpus: the first frame of its last clip as the portrait and that "
            "clip's audio as the speech -> OUT/<speaker>.mp4 through `vasa generate`; then checks (length, one "
            "face per frame, the three labels, the watermark after a CRF 23 re-encode) in REPORT."
        ),
    )
    parser.add_argument("--sample", type=Path, required=True, help="sample corpus folder (vasa sample OUT)")
    parser.add_argument("--bundle", type=Path, required=True, help="export output folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the videos and their inputs/")
    parser.add_argument("--report", type=Path, required=True, help="JSON report of the checks (DVC metrics)")
    parser.set_defaults(handler=_demo)
    return parser


def _audit(args: argparse.Namespace, params: Params) -> int:
    from preprocessing import denylist
    from vasa.provenance.audit import audit, write_report

    requests = denylist.load(args.denylist) if args.denylist else None
    report = audit(
        args.target, args.shards, args.manifest, args.dvc_lock, motion=args.motion,
        verify_content=args.verify_content, denylist=requests, history=args.history, scores=args.scores,
    )  # fmt: skip
    write_report(report, args.out)
    n = report.summary["counts"]["samples"]
    print(f"audit: {n['train']} samples trained on, {n['evaluation']} evaluation, {n['excluded']} excluded; {args.out}")
    if report.summary.get("takedown"):
        states = [f"{r['kind']} {r['id']}: {r['status']}" for r in report.summary["takedown"]]
        print("audit: takedown requests: " + "; ".join(states))
    for bundle in report.summary.get("takedown_history", []):
        held = [f"{r['kind']} {r['id']}: {r['status']}" for r in bundle["requests"] if r["status"] != "absent"]
        print(f"audit: earlier bundle {bundle['bundle_md5'][:12]}: {'; '.join(held) or 'clean'}")
    return 0


def _add_audit(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "audit",
        help="list the clips, speakers and licences that went into a bundle, verified against its lineage",
        description=(
            "Provenance audit (vasa/provenance/audit.py): follow the lineage in TARGET/model.json (a bundle or a "
            "train-latent/train-motion model folder) to the shards and the ingest manifest, check their sha256 "
            "against the recorded digests, and write OUT/clips.parquet (every sample trained on or used for "
            "evaluation, and every excluded clip with its reason: speaker, source, licence, media sha256), "
            "OUT/audit.json (checks, processing steps, counts), OUT/audit.md and OUT/croissant.json (Croissant 1.1 "
            "description of the shards, validated with mlcroissant). Exits 2, naming the file, when a digest does "
            "not match (the audit never describes other data than the model saw), when the Croissant description "
            "does not validate, or when a --denylist request is PRESENT among the samples."
        ),
    )
    parser.add_argument("--target", type=Path, required=True, help="bundle or stage model folder (with model.json)")
    parser.add_argument("--shards", type=Path, required=True, help="preprocess output folder (index.json + shards)")
    parser.add_argument("--manifest", type=Path, required=True, help="the ingest manifest (manifest.parquet)")
    parser.add_argument("--out", type=Path, required=True, help="folder for clips.parquet, audit.json, audit.md")
    parser.add_argument("--dvc-lock", type=Path, help="also check the bundle's recorded stage outputs against it")
    parser.add_argument("--motion", type=Path, help="extract-motion output folder: also check stage 2's data")
    _add_scores_option(parser, "the clips each filter removed are listed as excluded, with the reason")
    parser.add_argument(
        "--verify-content",
        action="store_true",
        help="also hash every shard's member bytes against stats.json (and motion tars against their index)",
    )
    parser.add_argument(
        "--denylist", type=Path, help="takedown denylist CSV: report each request as absent or PRESENT (an error)"
    )
    parser.add_argument(
        "--history",
        type=Path,
        help="with --denylist: the git checkout whose dvc.lock history names the earlier bundles; report which "
        "of them held each request (their manifest and shards read from the DVC cache)",
    )
    parser.set_defaults(handler=_audit)
    return parser


def _train_judges(args: argparse.Namespace, params: Params) -> int:
    from vasa.stages.train_judges import run

    results = run(
        params.judges, params.evaluate, args.shards, args.out, scores=args.scores, resume=args.resume,
        progress=not args.no_progress,
    )  # fmt: skip
    margins = {
        f"{judge}:{k.removeprefix('heldout/margin/')}": round(v, 3)
        for judge, result in results.items()
        for k, v in result.evaluation.items()
        if "margin" in k
    }
    print(f"train-judges: sync expert and CAPP in {args.out}; held-out margins (aligned/true minus control): {margins}")
    return 0


def _add_train_judges(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "train-judges",
        help="train the evaluation judges (sync expert for S_C/S_D, CAPP) on the shards",
        description=(
            "Train the SyncNet-style sync expert (mouth crops x log-mel, shifted audio as negatives) and CAPP "
            "(pose-sequence transformer x audio encoder, CLIP loss) with the shared engine on the train split of "
            "the shards, minus the evaluation clips (test split, else val, else the last clip of each speaker). "
            "Writes OUT/sync and OUT/capp (model/ as safetensors + model.json, live/ DVCLive metrics with the "
            "held-out check: aligned vs shifted audio, true vs shuffled pairs). Reads params `judges` and "
            "`evaluate`."
        ),
    )
    parser.add_argument("--shards", type=Path, required=True, help="preprocess output folder (index.json + shards)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the sync/ and capp/ run folders")
    _add_scores_option(
        parser,
        "the bootstrap's optional second round: retrain on the clips the first judges kept (not in dvc.yaml: "
        "the DVC stage trains on every clip, so a judge never filters its own training set)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest states in OUT/*/checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.set_defaults(handler=_train_judges)
    return parser


def _add_scores_option(parser: argparse.ArgumentParser, effect: str) -> None:
    parser.add_argument("--scores", type=Path, help=f"score table (`vasa score` OUT/scores.parquet): {effect}")


def _score(args: argparse.Namespace, params: Params) -> int:
    from vasa.stages.score import run

    metrics = run(params.score, params.evaluate, args.shards, args.judges, args.out, progress=not args.no_progress)
    _write_metrics(args.metrics, metrics)
    print(
        f"score: {metrics['clips']} clips, {metrics['by_status']}; rejected by reason {metrics['rejected_by_reason']}; "
        f"sync filter {metrics['judge']['sync_filter']}; {args.out}"
    )
    return 0


def _add_score(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "score",
        help="score every clip (A/V sync by the sync expert, no-reference image quality) and apply the filters",
        description=(
            "Score every sample of the shards (vasa/stages/score.py): the trained sync expert's S_C, S_D and best "
            "A/V offset over +-evaluate.sync_offsets frames (SyncNet's definition), and a no-reference image "
            "quality (blur index and frozen face blocks, no weights). Clips below params `score` thresholds are "
            "rejected with their reason; a confident offset within score.sync.max_offset is corrected instead. "
            "Writes OUT/scores.parquet, which train-latent and extract-motion read with --scores, and with "
            "--metrics the counts by status and reason."
        ),
    )
    parser.add_argument("--shards", type=Path, required=True, help="preprocess output folder (index.json + shards)")
    parser.add_argument("--judges", type=Path, required=True, help="train-judges output folder (sync/model)")
    parser.add_argument("--out", type=Path, required=True, help="folder for scores.parquet")
    _add_metrics_option(parser, "clips by status, rejections by reason, the judge check, score quantiles")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.set_defaults(handler=_score)
    return parser


def _evaluate(args: argparse.Namespace, params: Params) -> int:
    from vasa.labelling.labels import KEY_PASSWORD_ENV
    from vasa.stages.evaluate import run_evaluation

    key_password = os.environ.get(KEY_PASSWORD_ENV)
    report = run_evaluation(params, args.shards, args.bundle, args.judges, args.out, key_password=key_password)
    figures = {
        name: {k: round(v, 3) for k, v in report[name].items() if isinstance(v, float)}
        for name in ("real", "generated", "real_shifted", "generated_shifted")
    }
    print(f"evaluate: {len(report['clips'])} clips ({report['eval_set']['name']}); {figures}; {args.out}")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "evaluate",
        help="VASA-1's figures (S_C, S_D, CAPP, ΔP) on real, generated and audio-shifted evaluation clips",
        description=(
            "For every evaluation clip (test split, else val, else the last clip of each speaker): generate from "
            "its first frame and its audio with the bundle (vasa generate's path), re-measure landmarks and head "
            "pose on the generated frames with the preprocessing estimator, and score real and generated video "
            "with the trained judges, with the true audio and with the audio shifted by params "
            "evaluate.shift_frames. Writes OUT/metrics.json (DVC metrics), OUT/plots/*.csv (per clip), and a "
            "side-by-side MP4 and PNG strip of real vs generated for the first clip. Identity similarity and FVD "
            "need feature-network weights (params evaluate.*_weights); without them they are recorded as skipped."
        ),
    )
    parser.add_argument("--shards", type=Path, required=True, help="preprocess output folder (index.json + shards)")
    parser.add_argument("--bundle", type=Path, required=True, help="export output folder")
    parser.add_argument("--judges", type=Path, required=True, help="train-judges output folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder: metrics.json, plots/, side_by_side.*")
    parser.set_defaults(handler=_evaluate)
    return parser


def _retrain(args: argparse.Namespace, params: Params) -> int:
    from flows import retrain

    if args.serve:
        retrain.serve(params.retrain, args.repo, args.params, args.records)
        return 0
    if args.deploy:
        deployment = retrain.deploy(params.retrain, args.repo, args.params, args.records, args.deploy)
        print(f"retrain: deployment {deployment} on work pool {args.deploy}, cron {params.retrain.cron!r}")
        return 0
    record = retrain.run(args.repo, args.params, args.records, force=args.force)
    print(f"retrain {record['run']}: {record['decision']} ({record['reason']})")
    return 0


def _add_retrain(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "retrain",
        help="scheduled retraining: rebuild on new source data, promote the bundle only if the gate passes",
        description=(
            "Run the Prefect flow `retrain` (flows/retrain.py) in the DVC project REPO: `dvc repro ingest`, diff "
            "the manifest against the promoted run's, `dvc repro` params retrain.targets when clips were added, "
            "removed or changed, check params retrain.gate on the metrics, and promote (dvc push, commit dvc.lock, "
            "registry tags <artifact>@vX.Y.Z and <artifact>#<stage>#N) or refuse with the reason. Every run is "
            "recorded in RECORDS/runs/<run>.json; RECORDS/promoted.json names the promoted one. --serve runs it "
            "on params retrain.cron; --deploy registers it on a Prefect work pool (docs/OPERATIONS.md, "
            "cluster/README.md)."
        ),
    )
    parser.add_argument("--repo", type=Path, default=Path("."), help="DVC project root (default: %(default)s)")
    parser.add_argument(
        "--records", type=Path, default=Path("data/retrain"), help="run records under REPO (default: %(default)s)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild and gate even when no clip changed")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--serve", action="store_true", help="serve the flow on params retrain.cron (long-running)")
    mode.add_argument("--deploy", metavar="WORK_POOL", help="create a scheduled deployment on this work pool")
    parser.set_defaults(handler=_retrain)
    return parser


def _serve(args: argparse.Namespace, params: Params) -> int:
    from vasa.inference.bundle import load_bundle
    from vasa.inference.generate import resolve_device
    from vasa.inference.serve import create_app, serve_forever

    cfg, generate = params.serve, _generate_config(args, params)
    device = resolve_device(generate.device)
    _set_threads(generate.threads)
    bundle = load_bundle(args.bundle, device)
    app = create_app(bundle, cfg, generate, params.preprocess.face)
    host, port = args.host or cfg.host, cfg.port if args.port is None else args.port
    print(f"serve: bundle {bundle.sha256[:12]} on http://{host}:{port}/ (Ctrl-C stops)")
    serve_forever(app, cfg, host, port)
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "serve",
        help="stream talking faces over WebSockets, with a page that plays them (labelled as AI-generated)",
        description=(
            "Serve a bundle over HTTP and WebSockets (vasa/inference/serve.py, protocol in its docstring): a client "
            "sends a portrait and streams PCM16 audio, and receives watermarked JPEG frames with the audio they "
            "show, one frame per 1/fps s of audio. GET / is a page that plays a talking face from an audio file or "
            "the microphone. Bounds (sessions, audio per session, idle timeout, message size) and the address come "
            "from params `serve`, the face's settings from `generate`. Prints the address it serves on; Ctrl-C "
            "stops it."
        ),
    )
    parser.add_argument("--bundle", type=Path, required=True, help="export output folder")
    parser.add_argument("--host", help="address to listen on (default: params serve.host)")
    parser.add_argument("--port", type=int, help="port (default: params serve.port; 0 = any free port)")
    _add_device(parser)
    parser.set_defaults(handler=_serve)
    return parser


def _plan(args: argparse.Namespace, params: Params) -> int:
    from vasa.plan.budget import budget, render
    from vasa.plan.costs import GPUS, measure

    if args.gpu not in GPUS:
        raise InputError(f"unknown --gpu {args.gpu!r}; known: {', '.join(sorted(GPUS))}")
    if args.gpus < 1 or not 0 < args.mfu <= 1:
        raise InputError(f"--gpus must be >= 1 and --mfu in (0, 1], got {args.gpus} and {args.mfu}")
    wanted = dict(args.global_batch)
    plan = budget(params, measure(params), args.gpus, args.gpu, zero=args.zero, mfu=args.mfu, global_batch=wanted)
    print(render(plan, " + ".join(str(p) for p in [args.params, *args.overlay])))
    if plan.refusals:
        print("vasa plan: refused:\n" + "\n".join(f"  {r}" for r in plan.refusals), file=sys.stderr)
        return 2
    return 0


def _stage_batch(text: str) -> tuple[str, int]:
    stage, _, value = text.partition("=")
    if stage not in ("train_latent", "train_motion", "sync", "capp") or not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(
            f"expected STAGE=N with STAGE train_latent|train_motion|sync|capp, got {text!r}"
        )
    return stage, int(value)


def _add_plan(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "plan",
        help="print what the params will cost on N GPUs; refuse settings that cannot fit",
        description=(
            "Print the training budget of the params (with any --overlay, e.g. cluster/recipes/"
            "voxceleb2_512_8gpu.yaml) for VoxCeleb2 on N GPUs: per stage the global batch, steps, GPU-hours and "
            "wall hours, memory per GPU, checkpoint cadence; loader cores and RAM per GPU; storage for shards and "
            "checkpoints. FLOPs, activations and parameters are counted on the meta device from the params' own "
            "networks (vasa/plan/ states every constant and assumption). Exits 2, naming the setting, when "
            "memory, host RAM or loader cores cannot fit or a --global-batch cannot be kept. Nothing is written."
        ),
    )
    # `vasa plan --params P --overlay R` reads as well as `vasa --params P --overlay R plan`; given here they
    # replace the global ones.
    parser.add_argument("--params", type=Path, default=argparse.SUPPRESS, help="params file (as the global --params)")
    parser.add_argument(
        "--overlay", type=Path, action="append", default=argparse.SUPPRESS, help="overlay (as the global --overlay)"
    )
    parser.add_argument("--gpus", type=int, required=True, help="GPUs the training stages run on (all nodes)")
    parser.add_argument(
        "--gpu", default="h100", help="GPU kind in vasa.plan.costs.GPUS: h100, h200, a100 (default: %(default)s)"
    )
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0, help="DeepSpeed ZeRO stage (0 = DDP)")
    parser.add_argument("--mfu", type=float, default=0.3, help="assumed model FLOPs utilisation (default: %(default)s)")
    parser.add_argument(
        "--global-batch",
        type=_stage_batch,
        action="append",
        default=[],
        metavar="STAGE=N",
        help="refuse unless STAGE (train_latent, train_motion, sync, capp) trains with global batch N",
    )
    parser.set_defaults(handler=_plan)
    return parser


STAGES = (
    _add_sample,
    _add_ingest,
    _add_preprocess,
    _add_train_latent,
    _add_extract_motion,
    _add_train_motion,
    _add_export,
    _add_generate,
    _add_serve,
    _add_verify,
    _add_demo,
    _add_audit,
    _add_takedown,
    _add_pin_shards,
    _add_train_judges,
    _add_score,
    _add_evaluate,
    _add_retrain,
    _add_plan,
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
    parser.add_argument(
        "--overlay",
        type=Path,
        action="append",
        default=[],
        help="YAML of params keys to change, merged over --params and validated (repeatable; e.g. "
        "cluster/recipes/voxceleb2_512_8gpu.yaml)",
    )
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
    # The ephemeral server that `ingest` and `preprocess` start waits 20 s by default; on 2 busy cores
    # (a test suite on two workers beside a `dvc repro`) it took longer and the stage failed. A user's
    # own setting wins.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    # Apple Silicon (generate.device mps): operators without an MPS kernel run on the CPU instead of failing.
    # torch reads this once, when it is imported, which no subcommand has done yet. A user's own setting wins.
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Prefect's API calls, one line each
    try:
        params = load_params(args.params, args.overlay)
    except ConfigError as err:
        print(f"vasa: {err}", file=sys.stderr)
        return 2
    handler: Handler = args.handler
    try:
        return handler(args, params)
    except InputError as err:
        print(f"vasa {args.stage}: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # training diverged (vasa/training/engine.py): no state was written for it
        print(
            f"vasa {args.stage}: {err}: training diverged; --resume restarts from the last saved state", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
