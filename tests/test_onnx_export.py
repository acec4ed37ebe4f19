"""ONNX export of the renderer and the motion DiT step: onnxruntime (CPU) matches PyTorch, inputs matter."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.test_extract_motion import _one_thread  # noqa: F401 (autouse fixture: one intra-op thread)
from vasa.core.weights import write_weights
from vasa.inference import onnx_export
from vasa.inference.onnx_export import (
    DENOISER_INPUTS,
    OPSET,
    RENDERER_INPUTS,
    DenoiserGraph,
    RendererGraph,
    check_onnx,
    denoiser_inputs,
    export_denoiser,
    export_renderer,
    random_pose,
    renderer_inputs,
)
from vasa.models.face_latent import FaceLatent
from vasa.models.motion_dit import CONDITIONS, MotionDiT
from vasa.models.presets import get_motion_preset, get_preset

# Renderer outputs lie in [-1, 1] (measured max abs difference ~1.5e-6); the DiT's x0 is O(1) (~5e-7).
TOLERANCE = 1e-4


def _benchmark_main():
    """benchmarks/onnx_latency.py's main (the latency CLI lives with the benchmarks, not in the library)."""
    spec = importlib.util.spec_from_file_location(
        "onnx_latency", Path(__file__).parents[1] / "benchmarks" / "onnx_latency.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def face() -> FaceLatent:
    torch.manual_seed(0)
    model = FaceLatent(get_preset("tiny"), n_speakers=2).eval()
    with torch.no_grad():  # the expression field starts at zero (no effect): give the graph one to export
        for field in model.decoder.expression.parameters():
            torch.nn.init.normal_(field, std=0.002)  # x its gain (3-10): displacements of a few pixels
    return model


@pytest.fixture(scope="module")
def dit() -> MotionDiT:
    torch.manual_seed(0)
    model = MotionDiT(get_motion_preset("tiny"), motion_dim=39, audio_dim=320, emotion_dim=2, window=25, context=5)
    with torch.no_grad():  # DiT zero-initialises its output heads: x0 would be 0 whatever the inputs
        for layer in (model.modulation[-1], model.final_modulation[-1], model.out):
            torch.nn.init.normal_(layer.weight, std=0.05)
            torch.nn.init.normal_(layer.bias, std=0.05)
    return model.eval()


@pytest.fixture(scope="module")
def renderer_path(face, tmp_path_factory):
    return export_renderer(face, tmp_path_factory.mktemp("renderer") / "missing" / "renderer.onnx")


@pytest.fixture(scope="module")
def denoiser_path(dit, tmp_path_factory):
    return export_denoiser(dit, tmp_path_factory.mktemp("denoiser") / "denoiser.onnx")


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, inputs) -> np.ndarray:
    feed = {node.name: value.numpy() for node, value in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feed)[0]


def test_graph_inputs_opset_and_dynamic_batch(renderer_path, denoiser_path):
    for path, names in ((renderer_path, RENDERER_INPUTS), (denoiser_path, DENOISER_INPUTS)):
        model = onnx.load(str(path))
        assert [i.name for i in model.graph.input] == list(names)  # no input pruned away by the exporter
        assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == OPSET
        for value in (*model.graph.input, *model.graph.output):
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name
    assert renderer_path.parent.name == "missing"  # export created the folder
    assert not list(renderer_path.parent.glob("*.partial"))
    assert any(node.op_type == "GridSample" for node in onnx.load(str(renderer_path)).graph.node)


@pytest.mark.parametrize("batch", [1, 2])
def test_renderer_matches_pytorch(face, renderer_path, batch):
    inputs = renderer_inputs(face, batch, seed=10 + batch)
    assert inputs[RENDERER_INPUTS.index("pose")][:, :3].abs().max() > 5.0  # real head rotations, not ~0
    result = check_onnx(renderer_path, RendererGraph(face), inputs, runs=1)
    assert result["output_shape"] == [batch, 3, 64, 64]
    assert result["max_abs_diff"] < TOLERANCE
    assert result["torch_ms"] > 0 and result["onnxruntime_ms"] > 0


def test_renderer_onnx_follows_pose_and_dynamics(face, renderer_path):
    """Each of pose and dyn changes the ONNX output by far more than the tolerance, and the changed output
    still matches PyTorch: a graph that froze or ignored either input fails here."""
    session = _session(renderer_path)
    inputs = renderer_inputs(face, 2, seed=3)
    base = _run(session, inputs)
    other_pose = random_pose(2, torch.Generator().manual_seed(99))
    pose_at, dyn_at = RENDERER_INPUTS.index("pose"), RENDERER_INPUTS.index("dyn")
    other_dyn = torch.randn(inputs[dyn_at].shape, generator=torch.Generator().manual_seed(98)) * 3
    for index, value in ((pose_at, other_pose), (dyn_at, other_dyn)):
        changed = list(inputs)
        changed[index] = value
        got = _run(session, changed)
        with torch.no_grad():
            expected = RendererGraph(face)(*changed).numpy()
        assert np.abs(got - expected).max() < TOLERANCE
        assert np.abs(got - base).max() > 100 * TOLERANCE, RENDERER_INPUTS[index]


@pytest.mark.parametrize("batch", [1, 3])
def test_denoiser_matches_pytorch_with_guidance_masks(dit, denoiser_path, batch):
    inputs = denoiser_inputs(dit, batch, seed=20 + batch)
    result = check_onnx(denoiser_path, DenoiserGraph(dit), inputs, runs=1)
    assert result["output_shape"] == [batch, 25, 39]
    assert result["max_abs_diff"] < TOLERANCE


def test_denoiser_guided_batch_and_every_mask_matters(dit, denoiser_path):
    """The batched guided pass (copy 0 conditional, each other copy one condition dropped) through the ONNX
    graph equals the PyTorch model called with the same drop dict, and every mask and has_pre changes x0."""
    session = _session(denoiser_path)
    inputs = list(denoiser_inputs(dit, 1, seed=5, drop=False))
    copies = 1 + len(CONDITIONS)
    batched = [torch.cat([value] * copies) for value in inputs]
    first_mask = DENOISER_INPUTS.index("drop_context")
    for index in range(len(CONDITIONS)):
        batched[first_mask + index][index + 1] = True
    got = _run(session, batched)
    cond = dict(zip(DENOISER_INPUTS[2:9], batched[2:9], strict=True))
    drop = dict(zip(CONDITIONS, batched[first_mask:], strict=True))
    with torch.no_grad():
        expected = dit(batched[0], batched[1], cond, drop).numpy()
    assert np.abs(got - expected).max() < TOLERANCE
    for index, name in enumerate(CONDITIONS):
        assert np.abs(got[index + 1] - got[0]).max() > 100 * TOLERANCE, name
    no_pre = list(inputs)
    no_pre[DENOISER_INPUTS.index("has_pre")] = torch.zeros(1, dtype=torch.bool)
    assert np.abs(_run(session, no_pre) - got[:1]).max() > 100 * TOLERANCE  # has_pre False = context dropped
    assert np.abs(_run(session, no_pre) - got[1:2]).max() < TOLERANCE


def test_failed_export_leaves_no_file(face, tmp_path, monkeypatch):
    """Atomic write: a failing export leaves neither a partial file nor a changed previous file."""
    path = tmp_path / "renderer.onnx"
    path.write_bytes(b"previous")

    def broken(_path):
        raise onnx.checker.ValidationError("broken graph")

    monkeypatch.setattr(onnx_export.onnx.checker, "check_model", broken)
    with pytest.raises(onnx.checker.ValidationError):
        export_renderer(face, path)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["renderer.onnx"]


def test_main_writes_onnx_and_parity_report(face, dit, tmp_path):
    latent, motion, out = tmp_path / "latent", tmp_path / "motion", tmp_path / "out" / "onnx"
    write_weights(
        latent, {"generator": face.state_dict()}, {"task": {"preset": face.preset.describe(), "n_speakers": 2}}
    )
    task = {
        "task": "train_motion",
        "preset": dit.preset.describe(),
        **{key: getattr(dit, key) for key in ("motion_dim", "audio_dim", "emotion_dim", "window", "context")},
    }
    write_weights(motion, {"dit": dit.state_dict()}, {"task": task})
    main = _benchmark_main()
    assert main(["--latent", str(latent), "--dit", str(motion), "--out", str(out), "--runs", "1"]) == 0
    report = json.loads((out / "onnx.json").read_text())
    assert report["opset"] == OPSET
    for name in ("renderer", "denoiser"):
        entry = report[name]
        assert (out / entry["file"]).stat().st_size == entry["bytes"] > 100_000
        assert [check["batch"] for check in entry["checks"]] == [1, 2]
        assert all(check["max_abs_diff"] < TOLERANCE for check in entry["checks"])
    assert not list(out.glob("*.partial"))


def test_main_reports_unloadable_model(tmp_path):
    assert _benchmark_main()(["--dit", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out" / "onnx.json").exists()
