"""ONNX export of the two real-time networks, checked against PyTorch on onnxruntime (CPU).

What runs per output frame / per denoising step, as flat-tensor graphs (ONNX has no dicts or dataclasses):

    renderer.onnx   stage 1 `FaceLatent.render` (VASA-1 §3.1): warping generator (3D flow + rigid transform),
                    3D grid_sample of the canonical volume, the composed source grid (a second 3D
                    grid_sample) and the decoder (2D convs, 2D grid_sample of the source image, softmax mix).
                    Inputs volume (B, C, D, H, W), source_grid (B, D, H, W, 3), source_image (B, 3, S, S) in
                    [-1, 1] (the portrait's `Canonical`, computed once per portrait in PyTorch), z_id (B, I),
                    pose (B, 7) (yaw, pitch, roll in degrees, translation in volume units, log scale),
                    dyn (B, Z) -> image (B, 3, S, S) in [-1, 1].
    denoiser.onnx   stage 2 `MotionDiT.forward` (VASA-1 §3.2), one x0-prediction step for one window:
                    x_t (B, W, M), t (B,) int64 in [0, T), audio (B, W, A), motion_pre (B, K, M),
                    audio_pre (B, K, A), has_pre (B,) bool, gaze (B, 2) degrees, distance (B, 1),
                    emotion (B, E), and one (B,) bool drop mask per condition (drop_context, drop_audio,
                    drop_gaze, drop_distance, drop_emotion; True = null embedding) -> x0 (B, W, M).
                    The masks are graph inputs, so the one graph serves the batched classifier-free
                    guidance pass of `vasa.diffusion.guided_denoiser` (conditional + unconditional copies);
                    all-False masks are the plain conditional model.

Exporter: `torch.onnx.export(..., dynamo=False)` (the TorchScript exporter; the dynamo exporter needs
onnxscript), opset 20 (the first with a 5D GridSample), batch axis dynamic, weights embedded (the base
renderer and denoiser are far below protobuf's 2 GB limit). Each file is checked by `onnx.checker` and
written atomically (`<name>.partial`, renamed on success). The exporter lacks `aten::deg2rad` (the rotation
matrix of the warping generator): a symbolic for it (x * pi / 180) is registered before each export.

Parity: `check_onnx` runs the file on onnxruntime's CPUExecutionProvider and reports max / mean absolute
difference to the PyTorch module on the same inputs, and the median latency of both on one thread.

GPU caveat: onnxruntime's CUDA execution provider reportedly has no 5D GridSample kernel, so on GPU the
3D grid_sample nodes of the renderer would fall back to the CPU provider (or need TensorRT / a custom
op); only the CPU provider is checked here.

    python benchmarks/onnx_latency.py --latent data/latent/model --dit data/motion_dit/model --out data/onnx
"""

from __future__ import annotations

import logging
import math
import statistics
import time
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from vasa.core.digests import sha256_file
from vasa.core.files import atomic_path, write_json
from vasa.core.weights import load_weights
from vasa.models.face_latent import Canonical, FaceLatent
from vasa.models.motion_dit import CONDITIONS, MotionDiT

log = logging.getLogger(__name__)

OPSET = 20  # GridSample on 5D inputs (3D sampling) exists from opset 20
BATCH_AXIS = "batch"
RENDERER_INPUTS = ("volume", "source_grid", "source_image", "source_dyn", "z_id", "pose", "dyn")
RENDERER_OUTPUT = "image"
DENOISER_INPUTS = (
    "x_t",
    "t",
    "audio",
    "motion_pre",
    "audio_pre",
    "has_pre",
    "gaze",
    "distance",
    "emotion",
    *(f"drop_{name}" for name in CONDITIONS),
)
DENOISER_OUTPUT = "x0"
MAX_ANGLE_DEG = 20.0  # example poses: yaw, pitch, roll uniform in +-20 degrees


class RendererGraph(nn.Module):
    """`FaceLatent.render` with flat tensor inputs (RENDERER_INPUTS) -> image (B, 3, S, S) in [-1, 1]."""

    def __init__(self, face: FaceLatent) -> None:
        super().__init__()
        self.face = face

    def forward(
        self,
        volume: Tensor,
        source_grid: Tensor,
        source_image: Tensor,
        source_dyn: Tensor,
        z_id: Tensor,
        pose: Tensor,
        dyn: Tensor,
    ) -> Tensor:
        return self.face.render(Canonical(volume, source_grid, source_image, dyn=source_dyn), z_id, pose, dyn)


class DenoiserGraph(nn.Module):
    """`MotionDiT.forward` with the condition dict and the guidance drop masks as flat inputs (DENOISER_INPUTS)
    -> x0 (B, W, M)."""

    def __init__(self, dit: MotionDiT) -> None:
        super().__init__()
        self.dit = dit

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        audio: Tensor,
        motion_pre: Tensor,
        audio_pre: Tensor,
        has_pre: Tensor,
        gaze: Tensor,
        distance: Tensor,
        emotion: Tensor,
        *drop: Tensor,
    ) -> Tensor:
        cond = {
            "audio": audio,
            "motion_pre": motion_pre,
            "audio_pre": audio_pre,
            "has_pre": has_pre,
            "gaze": gaze,
            "distance": distance,
            "emotion": emotion,
        }
        return self.dit(x_t, t, cond, dict(zip(CONDITIONS, drop, strict=True)))


def random_pose(batch: int, generator: torch.Generator) -> Tensor:
    """(B, 7) head poses: angles uniform in +-MAX_ANGLE_DEG degrees, translation in +-0.1 volume units,
    log scale in +-0.1."""
    u = torch.rand(batch, 7, generator=generator) * 2 - 1
    return u * torch.tensor([MAX_ANGLE_DEG] * 3 + [0.1] * 4)


@torch.no_grad()
def renderer_inputs(face: FaceLatent, batch: int, seed: int = 0) -> tuple[Tensor, ...]:
    """Example RENDERER_INPUTS: the canonical face of random portraits (encoded as at run time), their
    identity, and random poses and dynamics (not the portraits' own, so the warp is not the identity)."""
    generator = torch.Generator().manual_seed(seed)
    size = face.preset.resolution
    image = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    code = face.encode(image)
    canonical = face.canonical(code, image)
    dyn = torch.randn(batch, face.preset.dynamics_dim, generator=generator)
    pose = random_pose(batch, generator)
    return canonical.volume, canonical.source_grid, canonical.image, code.dyn, code.z_id, pose, dyn


def denoiser_inputs(dit: MotionDiT, batch: int, seed: int = 0, drop: bool = True) -> tuple[Tensor, ...]:
    """Example DENOISER_INPUTS: random motion, audio and conditions, noise levels over [0, 1000); with `drop`,
    random drop masks and has_pre (as in a guided batch), else none dropped and has_pre True."""
    generator = torch.Generator().manual_seed(seed)
    w, k, m, a = dit.window, dit.context, dit.motion_dim, dit.audio_dim

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator)

    def masks() -> Tensor:
        return torch.rand(batch, generator=generator) < 0.5 if drop else torch.zeros(batch, dtype=torch.bool)

    has_pre = ~masks()
    return (
        randn(batch, w, m),
        torch.randint(0, 1000, (batch,), generator=generator),
        randn(batch, w, a),
        randn(batch, k, m),
        randn(batch, k, a),
        has_pre,
        randn(batch, 2) * 10.0,
        randn(batch, 1),
        randn(batch, dit.emotion_dim),
        *(masks() for _ in CONDITIONS),
    )


def _deg2rad(g, x):
    """ONNX for aten::deg2rad (used by the warping generator's rotation matrix), which the TorchScript
    exporter does not cover: x * pi / 180 (float32, the dtype of the exported graphs)."""
    return g.op("Mul", x, g.op("Constant", value_t=torch.tensor(math.pi / 180.0, dtype=torch.float32)))


def _export(module: nn.Module, inputs: tuple[Tensor, ...], names: Sequence[str], output: str, path: Path) -> Path:
    """Trace `module` on `inputs` into a checked ONNX file at `path` (parents created), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.register_custom_op_symbolic("aten::deg2rad", _deg2rad, OPSET)
    dynamic = {name: {0: BATCH_AXIS} for name in (*names, output)}
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        # shape checks and Python ints derived from static sizes (volume, window) are constants of the graph
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # the TorchScript exporter is chosen on purpose (no onnxscript here): its deprecation notices are known
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,  # traced in eval mode; the exporter restores the module's mode afterwards
            inputs,
            str(tmp),
            input_names=list(names),
            output_names=[output],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
        onnx.checker.check_model(str(tmp))
    return path


def export_renderer(face: FaceLatent, path: Path, batch: int = 1) -> Path:
    """Write `face`'s renderer (RendererGraph) to `path` as ONNX, traced at `batch`, batch axis dynamic."""
    return _export(RendererGraph(face), renderer_inputs(face, batch), RENDERER_INPUTS, RENDERER_OUTPUT, path)


def export_denoiser(dit: MotionDiT, path: Path, batch: int = 2) -> Path:
    """Write `dit`'s denoising step (DenoiserGraph) to `path` as ONNX, traced at `batch`, batch axis dynamic."""
    return _export(DenoiserGraph(dit), denoiser_inputs(dit, batch), DENOISER_INPUTS, DENOISER_OUTPUT, path)


def _median_ms(fn, runs: int) -> float:
    fn()  # warm-up: allocations, oneDNN / onnxruntime kernel selection
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def check_onnx(path: Path, torch_module: nn.Module, inputs: Sequence[Tensor], runs: int = 5) -> dict:
    """Run `path` on onnxruntime (CPUExecutionProvider) and `torch_module` on the same `inputs` (in the graph's
    input order), both on one thread. Returns max_abs_diff, mean_abs_diff, torch_ms and onnxruntime_ms (median
    of `runs` timed runs after one warm-up), batch and output shape."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [node.name for node in session.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"{path}: graph inputs {names} but {len(inputs)} tensors given")
    feed = {name: value.detach().cpu().numpy() for name, value in zip(names, inputs, strict=True)}
    threads, training = torch.get_num_threads(), torch_module.training
    torch.set_num_threads(1)
    torch_module.eval()
    try:
        with torch.no_grad():
            expected = torch_module(*inputs).cpu().numpy()
            (got,) = session.run(None, feed)
            torch_ms = _median_ms(lambda: torch_module(*inputs), runs)
        onnxruntime_ms = _median_ms(lambda: session.run(None, feed), runs)
    finally:
        torch.set_num_threads(threads)
        torch_module.train(training)
    if got.shape != expected.shape:
        raise ValueError(f"{path}: onnxruntime output {got.shape} != PyTorch {expected.shape}")
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    return {
        "batch": int(inputs[0].shape[0]),
        "output_shape": list(expected.shape),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "torch_ms": round(torch_ms, 3),
        "onnxruntime_ms": round(onnxruntime_ms, 3),
        "runs": runs,
    }


def load_motion_dit(model_dir: Path) -> tuple[MotionDiT, dict]:
    """The stage-2 motion DiT (EMA weights) out of a train-motion output folder, in eval mode, and its model.json."""
    from vasa.inference.bundle import build_dit

    weights, meta = load_weights(model_dir)
    task = meta.get("task", {})
    if task.get("task") != "train_motion" or "dit" not in weights:
        raise ValueError(f"{model_dir}: not a train-motion output (task {task.get('task')!r})")
    dit = build_dit(task)
    dit.load_state_dict(weights["dit"], strict=True)
    return dit.eval(), meta


def export_checked(kind: str, model: nn.Module, out: Path, batches: Sequence[int], runs: int) -> dict:
    """Export one network (`kind` "renderer" or "denoiser") into `out/<kind>.onnx` and check it at each batch
    size (different from the traced one: the batch axis must really be dynamic). Returns the JSON record."""
    graph: nn.Module
    if kind == "renderer":
        assert isinstance(model, FaceLatent)
        path = export_renderer(model, out / "renderer.onnx")
        graph, make_inputs = RendererGraph(model), partial(renderer_inputs, model)
    else:
        assert isinstance(model, MotionDiT)
        path = export_denoiser(model, out / "denoiser.onnx")
        graph, make_inputs = DenoiserGraph(model), partial(denoiser_inputs, model)
    checks = [check_onnx(path, graph, make_inputs(batch, seed=batch), runs) for batch in batches]
    for check in checks:
        log.info("%s batch %d: %s", kind, check["batch"], check)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path), "checks": checks}


TIMING_KEYS = ("torch_ms", "onnxruntime_ms", "runs")


def export_bundle_onnx(bundle_dir: Path, batches: Sequence[int] = (1, 2)) -> dict:
    """`vasa export` with params export.onnx: renderer.onnx, denoiser.onnx and onnx.json (parity at each
    batch size, file digests) in BUNDLE/onnx/. No latencies in the artifact (they vary run to run; the
    benchmark benchmarks/onnx_latency.py and docs/BENCHMARKS.md have them), so the same bundle gives the same files."""
    from vasa.inference.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    out = bundle_dir / "onnx"
    report: dict = {"opset": OPSET, "exporter": "torch.onnx.export(dynamo=False)", "bundle_sha256": bundle.sha256}
    for kind, model in (("renderer", bundle.face), ("denoiser", bundle.dit)):
        record = export_checked(kind, model, out, batches, runs=1)
        record["checks"] = [{k: v for k, v in c.items() if k not in TIMING_KEYS} for c in record["checks"]]
        report[kind] = record
    write_json(out / "onnx.json", report)
    return report
