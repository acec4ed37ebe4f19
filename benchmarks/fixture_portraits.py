"""Unseen faces, other voices: the fixtures' portraits with the fixtures' speech through a bundle, measured
as a viewer would, without the project's judges (vasa.evaluation.independent: FaceMesh mouth opening, its
std and its best r with the loudness; face sharpness against the portrait; yaw-change autocorrelation).

    python benchmarks/fixture_portraits.py --bundle data/bundle --out runs/fixtures [--seconds 8]

Every portrait (img*) is driven by every speech clip (aud*), the first `--seconds` of it; the videos,
figures.json and a contact sheet (a row per video) land in OUT. The fixtures are real people and voices
the sample corpus never saw: the `tiny` bundle of `make repro` is trained on two synthetic speakers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fixtures", type=Path, default=FIXTURES)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--seconds", type=float, default=8.0, help="speech used per clip (its first seconds)")
    args = parser.parse_args(argv)
    if not args.fixtures.is_dir():
        raise SystemExit(f"{args.fixtures}: no fixtures folder")

    from preprocessing.decode import read_frames
    from vasa.core.config import load_params
    from vasa.evaluation.independent import measure_video
    from vasa.inference.bundle import load_bundle
    from vasa.inference.generate import generate_file
    from vasa.inference.portrait import read_portrait
    from vasa.inference.speech import load_speech

    params = load_params(args.params)
    bundle = load_bundle(args.bundle, "cpu")
    rate, fps = bundle.meta["audio"]["sample_rate"], bundle.meta["fps"]
    args.out.mkdir(parents=True, exist_ok=True)
    portraits = sorted(p for p in args.fixtures.glob("img*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    speeches = sorted(args.fixtures.glob("aud*.wav"))
    figures, rows = {}, []
    for speech_path in speeches:
        speech = load_speech(speech_path, rate, fps, params.generate)[: int(args.seconds * rate)]
        trimmed = args.out / f"{speech_path.stem}.wav"
        soundfile.write(trimmed, speech, rate)
        for image in portraits:
            name = f"{image.stem}__{speech_path.stem}"
            video = args.out / f"{name}.mp4"
            generate_file(bundle, image, trimmed, video, params.generate, params.preprocess.face)
            frames, _ = read_frames(video)
            portrait = read_portrait(image, params.generate.max_side)
            seen = measure_video(frames, speech, fps, portrait, params.preprocess.face, sample_rate=rate)
            figures[name] = seen
            print(name, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in seen.items()}))
            pick = np.linspace(0, len(frames) - 1, 8).round().astype(int)
            cells = [np.asarray(Image.fromarray(frames[i]).resize((160, 160))) for i in pick]
            rows.append(np.concatenate(cells, axis=1))
    (args.out / "figures.json").write_text(json.dumps(figures, indent=1, sort_keys=True, default=float) + "\n")
    Image.fromarray(np.concatenate(rows)).save(args.out / "contact_sheet.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
