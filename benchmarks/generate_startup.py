"""The fixed start-up of one `vasa generate` call, phase by phase, in a fresh process: what every call pays
before its first frame whatever the length of the speech.

    python benchmarks/generate_startup.py [--bundle DIR] [--image PORTRAIT] [--repeats 3] [--threads 1]

Phases, in `vasa generate`'s order (vasa/cli.py `_generate`, vasa/inference/generate.py `generate_file`):
imports (torch, then vasa.inference.generate and what it pulls in), load_bundle (check and load the weights),
prepare_portrait (FaceMesh on the portrait), load_speech (1 s of speech), open_session (the encoders once, and
librosa's first log-mel call: its imports and numba's cache). Each repeat is a new Python process (the
imports count); printed: CPU seconds of the process and wall seconds per phase, the best repeat by total CPU.
--bundle defaults to the tests' tiny bundle written to a temporary folder; --image to the fixtures' first
portrait (needs a face for FaceMesh).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("VASA_FIXTURES", ROOT.parent / "shared" / "fixtures"))

PHASES = r"""
import json, sys, time
from pathlib import Path
marks = []
last = [time.perf_counter(), time.process_time()]
def mark(name):
    now = [time.perf_counter(), time.process_time()]
    marks.append((name, now[1] - last[1], now[0] - last[0]))
    last[:] = now
import torch; mark("import torch")
torch.set_num_threads(THREADS)
import numpy as np, soundfile
from vasa.core.config import load_params
from vasa.inference import generate
from vasa.inference.bundle import load_bundle
params = load_params(Path(ROOT) / "params.yaml"); mark("import vasa.inference.generate, params")
bundle = load_bundle(Path(BUNDLE)); mark("load_bundle")
cfg = params.generate
portrait = generate.prepare_portrait(Path(IMAGE), bundle.resolution, bundle.meta["crop"]["crop_size"],
                                     params.preprocess.face, cfg.max_side); mark("prepare_portrait (FaceMesh)")
rate = bundle.meta["audio"]["sample_rate"]
wav = Path(OUT) / "speech.wav"
soundfile.write(wav, np.random.default_rng(0).normal(0, 0.1, rate).astype(np.float32), rate)
last[:] = [time.perf_counter(), time.process_time()]
speech = generate.load_speech(wav, rate, bundle.meta["fps"], cfg); mark("load_speech (1 s)")
session = generate.open_session(bundle, portrait); mark("open_session (encoders, librosa warm-up)")
print(json.dumps({"phases": marks, "dynamo": "torch._dynamo" in sys.modules}))
"""


def run_once(bundle: Path, image: Path, threads: int, folder: Path) -> dict:
    values = {"THREADS": str(threads), "BUNDLE": repr(str(bundle)), "IMAGE": repr(str(image)),
              "OUT": repr(str(folder)), "ROOT": repr(str(ROOT))}  # fmt: skip
    code = PHASES
    for name, value in values.items():
        code = code.replace(name, value)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--image", type=Path, default=FIXTURES / "img01_float_sam_altman_512x512.jpg")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vasa-startup-") as folder:
        bundle = args.bundle
        if bundle is None:
            sys.path.insert(0, str(ROOT))
            from tests.fixtures_pipeline import write_tiny_bundle
            from vasa.core.config import load_params

            bundle = write_tiny_bundle(load_params(ROOT / "params.yaml"), Path(folder) / "bundle")
        runs = [run_once(bundle, args.image, args.threads, Path(folder)) for _ in range(args.repeats)]
    best = min(runs, key=lambda run: sum(cpu for _, cpu, _ in run["phases"]))
    print(f"# {args.repeats} fresh processes, best by CPU; torch threads {args.threads}; torch._dynamo imported: "
          f"{best['dynamo']}\n")  # fmt: skip
    print("| phase | CPU s | wall s |")
    print("|---|---|---|")
    for name, cpu, wall in best["phases"]:
        print(f"| {name} | {cpu:.2f} | {wall:.2f} |")
    totals = [sum(cpu for _, cpu, _ in run["phases"]) for run in runs]
    print(f"| **total** | **{min(totals):.2f}** (runs: {', '.join(f'{t:.2f}' for t in totals)}) "
          f"| {sum(wall for _, _, wall in best['phases']):.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
