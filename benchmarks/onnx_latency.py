"""ONNX export of a stage-1 renderer and/or a stage-2 denoiser with parity and latency on onnxruntime's CPU
provider against PyTorch, one thread (vasa.inference.onnx_export does the export and the checks).

    python benchmarks/onnx_latency.py --latent data/latent/model --dit data/motion_dit/model --out data/onnx

Writes OUT/renderer.onnx, OUT/denoiser.onnx and OUT/onnx.json (with latencies, unlike the bundle's copy).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from vasa.core.files import write_json
from vasa.inference.onnx_export import OPSET, export_checked, load_motion_dit
from vasa.models.face_latent import load_face_latent

log = logging.getLogger("onnx_latency")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", type=Path, help="stage-1 model folder (train-latent output)")
    parser.add_argument("--dit", type=Path, help="stage-2 model folder (train-motion output)")
    parser.add_argument("--out", type=Path, required=True, help="folder for renderer.onnx, denoiser.onnx, onnx.json")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="batch sizes checked")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per latency figure")
    args = parser.parse_args(argv)
    if args.latent is None and args.dit is None:
        parser.error("give --latent and/or --dit")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report: dict = {
        "opset": OPSET,
        "exporter": "torch.onnx.export(dynamo=False)",
        "provider": "CPUExecutionProvider",
        "threads": 1,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
    }
    if args.latent is not None:
        try:
            face, meta = load_face_latent(args.latent)
        except (FileNotFoundError, ValueError, RuntimeError) as err:  # RuntimeError: weights of another version
            log.error("cannot load the stage-1 model: %s", err)
            return 1
        record = export_checked("renderer", face, args.out, args.batches, args.runs)
        report["renderer"] = {"source": str(args.latent), "preset": face.preset.name, **record}
        report["renderer"]["weights_sha256"] = meta["weights"]["generator"]["sha256"]
    if args.dit is not None:
        try:
            dit, meta = load_motion_dit(args.dit)
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
            log.error("cannot load the stage-2 model: %s", err)
            return 1
        record = export_checked("denoiser", dit, args.out, args.batches, args.runs)
        report["denoiser"] = {"source": str(args.dit), "preset": dit.preset.name, **record}
        report["denoiser"]["weights_sha256"] = meta["weights"]["dit"]["sha256"]
    write_json(args.out / "onnx.json", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
