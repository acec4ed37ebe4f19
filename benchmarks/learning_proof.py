"""Does the stack learn to talk? The whole chain trained longer on the sample corpus, then measured as a
viewer would, on held-out sentences, without the project's own judges deciding it.

    python benchmarks/learning_proof.py --out runs/proof                       # the full run (~1-2 h, 2 cores)
    python benchmarks/learning_proof.py --out runs/quick --set train_latent.train.steps=20 \\
        --set train_motion.train.steps=20 --set judges.sync.train.steps=10 ...   # a smoke run

params.yaml with benchmarks/learning_proof.yaml merged over it (and any --set KEY=VALUE) is written to
OUT/params.yaml and validated by the project's config loader; every stage then runs as
`python -m vasa.cli --params OUT/params.yaml <command>` with its outputs under OUT. Stage 1 keeps a state every
`checkpoint_every` steps; the chain goes on from the one whose validation check is best (`select_stage1`: the
worst speaker's mouth r on the held-out tails of train clips; `--stage1 last` keeps the last weights), and
`--from-run RUN --stage1-step N` trains stage 2 onward on another run's state N. Reported (OUT/proof.json,
OUT/contact_sheet.png, OUT/curves/): the stage-1 reconstruction check (a held-out clip's first frame driven
by every frame's own motion: FaceMesh mouth opening of the reconstruction against the driver's, r and std),
the demo's judge-free figures on the held-out clips against the real clips' (mouth r with the loudness,
opening std, sharpness against the portrait, yaw-change autocorrelation), and evaluate's S_C.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OVERLAY = Path(__file__).with_name("learning_proof.yaml")


def merged_params(overlay: Path, sets: list[str]) -> dict:
    """params.yaml with the overlay's keys (nested) and KEY=VALUE pairs (dotted keys, YAML values) over it."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())

    def put(tree: dict, dotted: str, value) -> None:
        *parents, leaf = dotted.split(".")
        for key in parents:
            tree = tree[key]
        if leaf not in tree:
            raise SystemExit(f"--set {dotted}: no such key in params.yaml")
        tree[leaf] = value

    def walk(tree: dict, prefix: str = "") -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                put(params, f"{prefix}{key}", value)

    walk(yaml.safe_load(overlay.read_text()) or {})
    for item in sets:
        key, _, value = item.partition("=")
        put(params, key, yaml.safe_load(value))
    return params


def vasa(params: Path, *args: str) -> float:
    """One `vasa` command in a subprocess (its own threads and memory); its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vasa.cli", "--params", str(params), *args], cwd=ROOT, check=True)
    return time.perf_counter() - start


def run_chain(out: Path, params: Path, after: dict | None = None) -> dict[str, float]:
    """Every stage in a subprocess, resuming after the last finished one; `after[stage](out)` runs once
    when `stage` has finished (before the next stage)."""
    data = out / "data"
    steps = {
        "sample": ["sample", "--out", f"{data}/sample"],
        "ingest": ["ingest", "--out", f"{data}/ingest", "--sample-dir", f"{data}/sample"],
        "preprocess": ["preprocess", "--manifest", f"{data}/ingest/manifest.parquet", "--out", f"{data}/shards",
                       "--cache", f"{data}/preprocess_cache"],
        "train_latent": ["train-latent", "--shards", f"{data}/shards", "--out", f"{data}/latent", "--no-progress"],
        "extract_motion": ["extract-motion", "--shards", f"{data}/shards", "--latent", f"{data}/latent/model",
                           "--out", f"{data}/motion", "--no-progress"],
        "train_motion": ["train-motion", "--motion", f"{data}/motion", "--out", f"{data}/motion_dit", "--no-progress"],
        "export": ["export", "--latent", f"{data}/latent/model", "--motion-dit", f"{data}/motion_dit/model",
                   "--out", f"{data}/bundle", "--dvc-lock", str(ROOT / "dvc.lock")],
        "demo": ["demo", "--sample", f"{data}/sample", "--bundle", f"{data}/bundle", "--out", f"{data}/demo/videos",
                 "--report", f"{data}/demo/report.json"],
        "train_judges": ["train-judges", "--shards", f"{data}/shards", "--out", f"{data}/judges", "--no-progress"],
        "evaluate": ["evaluate", "--shards", f"{data}/shards", "--bundle", f"{data}/bundle", "--judges",
                     f"{data}/judges", "--out", f"{data}/evaluate"],
    }  # fmt: skip
    seconds = {}
    for name, args in steps.items():
        done = out / f".done_{name}"
        if done.exists():  # a re-run resumes after the last finished stage
            seconds[name] = json.loads(done.read_text())["seconds"]
        else:
            try:
                seconds[name] = round(vasa(params, *args), 1)
            except subprocess.CalledProcessError:
                if name != "demo":  # the demo exits 1 when a label check fails: its report is still written
                    raise
                seconds[name] = float("nan")
            done.write_text(json.dumps({"seconds": seconds[name]}))
            (out / f".done_after_{name}").unlink(missing_ok=True)  # a re-made stage's hook runs again
        hooked = out / f".done_after_{name}"
        if after and name in after and not hooked.exists():
            later = [n for n in list(steps)[list(steps).index(name) + 1 :] if (out / f".done_{n}").exists()]
            if later:  # the stages after it were made from its output as it was: changing it now would mix two
                raise SystemExit(f"{out}: {name} is followed by finished stages ({', '.join(later)}) made "
                                 f"without its after-step; start a new --out")  # fmt: skip
            after[name](out)
            hooked.write_text("{}")
    return seconds


# What a run trained on a stage-1 state of another run takes over from it: the stages before stage 1 and the
# judges (neither depends on the stage-1 model), by hard link.
SHARED_STAGES = {"sample": "sample", "ingest": "ingest", "preprocess": "shards", "train_judges": "judges"}


def state_model(run: Path, step: int, model: Path) -> None:
    """Write `run`'s stage-1 resumable state at `step` as a stage-1 model folder `model`: its EMA weights with
    the model.json of `run`'s last stage-1 weights (latent/model_last once a state was selected; step replaced)."""
    from vasa.core.weights import load_weights
    from vasa.training import checkpoint

    state = checkpoint.state_dir(run / "data" / "latent" / "checkpoints", step)
    problem = checkpoint.state_problem(state)
    if problem is not None:
        raise ValueError(f"{state}: {problem}")
    weights, _ = checkpoint.read_engine_state(state)
    latent = run / "data" / "latent"
    _, meta = load_weights(latent / "model_last" if (latent / "model_last").exists() else latent / "model")
    meta = {k: v for k, v in meta.items() if k not in ("files", "json_sha256")} | {"step": step}
    checkpoint.write_model(model, weights, meta)  # whole or not at all


def scan_stage1(run: Path) -> list[dict]:
    """The validation and test reconstruction checks of every kept stage-1 state of `run`."""
    import tempfile

    from vasa.training import checkpoint

    params_file, sample = run / "params.yaml", run / "data" / "sample"
    test_clip = sample / sample_records(sample, "test")[0]["file"]
    rows = []
    for step, _ in checkpoint.complete_states(run / "data" / "latent" / "checkpoints"):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                state_model(run, step, Path(tmp) / "model")
            except ValueError as err:  # a state that is not intact (NaN, a digest mismatch): not a candidate
                print(json.dumps({"step": step, "skipped": str(err)}), flush=True)
                continue
            rows.append({
                "step": step,
                "validation": validation_check(Path(tmp) / "model", sample, params_file),
                "test": reconstruction_check(Path(tmp) / "model", test_clip, params_file)[0],
            })  # fmt: skip
        print(json.dumps(rows[-1], default=float), flush=True)
    return rows


def validation_score(row: dict) -> float:
    """What a stage-1 state is chosen by: the worst speaker's validation mouth r (NaN counts as -1)."""
    values = [v["mouth_r"] for v in row["validation"].values()]
    return min(v if np.isfinite(v) else -1.0 for v in values)


def select_stage1(out: Path) -> None:
    """Keep as the stage-1 model the kept state whose validation check is best (`validation_score`: the
    held-out tails of train clips, never the test sentences); the last weights move to latent/model_last.
    The checks of every state, test included for the record, go to OUT/stage1_selection.json."""
    rows = scan_stage1(out)
    if not rows:
        raise SystemExit(f"{out}: no intact stage-1 state to choose from")
    best = max(rows, key=validation_score)
    latent = out / "data" / "latent"
    if not (latent / "model_last").exists():
        (latent / "model").rename(latent / "model_last")
    state_model(out, best["step"], latent / "model")
    report = {"rule": "max over kept states of min over train speakers of validation mouth r", "selected": best["step"],
              "states": rows}  # fmt: skip
    (out / "stage1_selection.json").write_text(json.dumps(report, indent=1, default=float) + "\n")


def from_stage1_state(run: Path, step: int, out: Path) -> None:
    """Start `out` as `run` trained only to `step` in stage 1: its shared stages linked, and as its stage-1
    model the EMA weights of `run`'s resumable state at `step` with `run`'s model.json (step replaced). The
    chain then resumes at extract_motion (the states are kept by `train_latent.train.keep_checkpoints`)."""
    import os

    state_model(run, step, out / "data" / "latent" / "model")
    for stage, folder in SHARED_STAGES.items():
        if not (run / f".done_{stage}").exists():  # not run yet there (the judges come last): run here
            continue
        shutil.rmtree(out / "data" / folder, ignore_errors=True)  # a copy a killed earlier try left
        shutil.copytree(run / "data" / folder, out / "data" / folder, copy_function=os.link)
        shutil.copy(run / f".done_{stage}", out / f".done_{stage}")
    (out / ".done_train_latent").write_text(json.dumps({"seconds": float("nan"), "from": str(run), "step": step}))


def sample_records(sample: Path, split: str) -> list[dict]:
    """The sample corpus's clip records (`<clip_id>.json`) of one split, by clip id."""
    index = json.loads((sample / "index.json").read_text())
    records = [json.loads((sample / f"{c['clip_id']}.json").read_text()) for c in index["clips"]]
    return sorted((r for r in records if r.get("split") == split), key=lambda r: r["clip_id"])


def first_per_speaker(records: list[dict]) -> list[dict]:
    """The first record of every speaker, by speaker id."""
    first: dict[str, dict] = {}
    for record in records:
        first.setdefault(record["speaker_id"], record)
    return [first[speaker] for speaker in sorted(first)]


def reconstruction_check(
    latent: Path, clip: Path, params_file: Path, tail: float | None = None
) -> tuple[dict, np.ndarray]:
    """The clip's first frame driven by every frame's own stage-1 motion (`tail`: only the clip's last
    `tail` of frames, the part stage 1 holds out of a train clip); FaceMesh mouth opening of the
    reconstruction against the driver's. Returns the figures and a strip (driver over reconstruction)."""
    import cv2
    import torch

    from preprocessing import face as face_mod
    from preprocessing import pose as pose_mod
    from preprocessing.decode import read_frames
    from vasa.core.config import load_params
    from vasa.evaluation.independent import mouth_opening, track_enlarged
    from vasa.inference.portrait import pose_columns
    from vasa.loaders.pairs import train_frames
    from vasa.models.face_latent import Canonical, load_face_latent
    from vasa.models.images import to_tensor, to_uint8
    from vasa.models.motion_encoder import shard_pose_to_model

    params = load_params(params_file)
    model, _ = load_face_latent(latent)
    frames, _ = read_frames(clip)
    tracker = face_mod.get_tracker(params.preprocess.face)
    landmarks = tracker.track(frames).landmarks
    transform = face_mod.box_transform(landmarks[:1], params.preprocess.crop_size, params.preprocess.face.crop_scale,
                                       frames.shape[1:3])  # fmt: skip
    crops = np.stack([face_mod.crop_frame(f, transform, params.preprocess.crop_size) for f in frames])
    if tail is not None:  # frame 0 stays first as the source; the drivers are the held-out tail only
        if not 0 < tail < 1:
            raise SystemExit(f"held-out tail {tail}: stage 1 holds no frames out (train_latent.data.holdout_fraction)")
        keep = np.r_[0, np.arange(train_frames(len(frames), tail), len(frames))]
        frames, crops, landmarks = frames[keep], crops[keep], landmarks[keep]
    side = model.preset.resolution
    small = np.stack([cv2.resize(c, (side, side), interpolation=cv2.INTER_AREA) for c in crops])
    expression = torch.from_numpy(pose_mod.expression(landmarks, pose_mod.head_pose(landmarks))).float()
    head = pose_mod.head_pose(face_mod.transform_points(landmarks, np.repeat(transform[None], len(frames), 0)))
    pose = shard_pose_to_model(torch.from_numpy(pose_columns(head)), params.preprocess.crop_size,
                               model.preset.canonical_scale)  # fmt: skip
    with torch.no_grad():
        source = to_tensor(small[0])[None]
        code = model.measured(model.encode(source), expression[:1], pose[:1])
        canonical = model.canonical(code, source)
        hires = to_tensor(crops[0])[None]
        out = []
        for start in range(0, len(small), 16):
            driver = torch.stack([to_tensor(x) for x in small[start : start + 16]])
            motion = model.measured(model.encode(driver, appearance=False), expression[start : start + 16],
                                    pose[start : start + 16])  # fmt: skip
            n = len(driver)
            batch = Canonical(canonical.volume.expand(n, -1, -1, -1, -1),
                              canonical.source_grid.expand(n, -1, -1, -1, -1), canonical.image.expand(n, -1, -1, -1),
                              hires.expand(n, -1, -1, -1), code.dyn.expand(n, -1))  # fmt: skip
            out.append(to_uint8(model.render(batch, code.z_id.expand(n, -1), motion.pose, motion.dyn)))
    recon = np.concatenate(out)
    real = mouth_opening(track_enlarged(crops, params.preprocess.face))  # tracked at >= 384 px, as evaluate does
    made = mouth_opening(track_enlarged(recon, params.preprocess.face))
    if tail is not None:  # the source re-rendered as itself is not a driver
        real, made = real[1:], made[1:]
    ok = np.isfinite(real) & np.isfinite(made)
    r = float(np.corrcoef(real[ok], made[ok])[0, 1]) if ok.sum() > 2 else float("nan")
    pick = np.linspace(0, len(crops) - 1, 8).round().astype(int)
    strip = np.concatenate([np.concatenate(list(crops[pick]), axis=1), np.concatenate(list(recon[pick]), axis=1)])
    figures = {"mouth_r": r, "opening_std_driver": float(np.nanstd(real)), "opening_std_recon": float(np.nanstd(made))}
    return figures, strip


def validation_check(latent: Path, sample: Path, params_file: Path) -> dict[str, dict]:
    """The reconstruction check on frames stage 1 never trained on that are not the test sentences: per
    train speaker, the first train clip's first frame driven by its held-out tail
    (`train_latent.data.holdout_fraction`). What a checkpoint can be chosen by without seeing the test split."""
    from vasa.core.config import load_params

    tail = load_params(params_file).train_latent.data.holdout_fraction
    return {
        record["speaker_id"]: reconstruction_check(latent, sample / record["file"], params_file, tail)[0]
        for record in first_per_speaker(sample_records(sample, "train"))
    }


def contact_sheet(data: Path, clips: list[dict], columns: int = 8) -> np.ndarray:
    """Per held-out clip: real frames over the generated video's frames at the same times (resized)."""
    from preprocessing.decode import read_frames

    rows = []
    for clip in clips:
        real, _ = read_frames(data / "sample" / clip["file"])
        made, _ = read_frames(data / "demo" / "videos" / f"{clip['speaker_id']}.mp4")
        n = min(len(real), len(made))
        pick = np.linspace(0, n - 1, columns).round().astype(int)
        side = 160
        for video in (real, made):
            cells = [np.asarray(Image.fromarray(video[i]).resize((side, side), Image.Resampling.LANCZOS)) for i in pick]
            rows.append(np.concatenate(cells, axis=1))
    return np.concatenate(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="run folder (resumes after the last finished stage)")
    parser.add_argument("--overlay", type=Path, default=OVERLAY, help="params overlay (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="one more params override")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--from-run", type=Path, help="a finished run whose stage-1 state --stage1-step to go on from")
    parser.add_argument("--stage1-step", type=int, help="with --from-run: the stage-1 state (step) to use")
    parser.add_argument("--stage1", choices=("validation", "last"), default="validation",
                        help="the stage-1 weights the chain goes on with: the kept state with the best validation "
                        "check (default), or the last")  # fmt: skip
    parser.add_argument("--scan-stage1", action="store_true", help="only the reconstruction checks of every kept "
                        "stage-1 state of the finished run --out (to OUT/stage1_scan.json)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.scan_stage1:
        rows = scan_stage1(args.out)
        (args.out / "stage1_scan.json").write_text(json.dumps(rows, indent=1, default=float) + "\n")
        return 0
    if (args.from_run is None) != (args.stage1_step is None):
        parser.error("--from-run and --stage1-step go together")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_run is not None and not (args.out / ".done_train_latent").exists():
        from_stage1_state(args.from_run, args.stage1_step, args.out)
    params_file = args.out / "params.yaml"
    params = merged_params(args.overlay, args.set)
    params["preprocess"]["shards"]["pin"] = None  # the run's own layout, not the checkout's pin file
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    select = {} if args.from_run is not None or args.stage1 == "last" else {"train_latent": select_stage1}
    seconds = run_chain(args.out, params_file, after=select)
    data = args.out / "data"
    clips = sample_records(data / "sample", "test")
    if not clips:
        raise SystemExit("the sample corpus has no held-out clips (params sample.heldout_clips_per_identity)")
    recon, strip = reconstruction_check(data / "latent" / "model", data / "sample" / clips[0]["file"], params_file)
    Image.fromarray(strip).save(args.out / "reconstruction.png")
    selection_file = args.out / "stage1_selection.json"
    selection = json.loads(selection_file.read_text()) if selection_file.exists() else None
    if selection is not None:  # the chosen state's validation check was made when it was chosen
        validation = next(row["validation"] for row in selection["states"] if row["step"] == selection["selected"])
    else:
        validation = validation_check(data / "latent" / "model", data / "sample", params_file)
    demo = json.loads((data / "demo" / "report.json").read_text())
    evaluate = json.loads((data / "evaluate" / "metrics.json").read_text())
    Image.fromarray(contact_sheet(data, clips)).save(args.out / "contact_sheet.png")
    curves = args.out / "curves"
    for stage in ("latent", "motion_dit"):
        if (data / stage / "live" / "plots").is_dir():
            shutil.copytree(data / stage / "live" / "plots", curves / stage, dirs_exist_ok=True)
    report = {
        "seconds": seconds,
        "steps": {
            "train_latent": params["train_latent"]["train"]["steps"],
            "train_motion": params["train_motion"]["train"]["steps"],
        },  # fmt: skip
        "stage1_model_step": json.loads((data / "latent" / "model" / "model.json").read_text())["step"],
        "stage1_reconstruction": recon,
        "stage1_validation": validation,
        "stage1_selection": selection,
        "demo_independent": {name: video["independent"] for name, video in demo["videos"].items()},
        "evaluate": {
            "eval_set": evaluate["eval_set"]["name"],
            "independent": evaluate["independent"],
            "S_C": {"real": evaluate["real"]["S_C"], "generated": evaluate["generated"]["S_C"]},
        },
    }
    text = json.dumps(report, indent=1, sort_keys=True, default=float)
    (args.out / "proof.json").write_text(text + "\n")
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
