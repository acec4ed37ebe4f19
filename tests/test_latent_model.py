"""Stage-1 networks: shapes, ranges, warping geometry, gradients, and LatentTask learning on a fixed batch."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from preprocessing.pose import euler_to_matrix
from preprocessing.schema import POSE_COLUMNS
from vasa.core.config import LatentLossConfig
from vasa.core.weights import load_weights
from vasa.models.discriminator import MultiScaleDiscriminator
from vasa.models.expression import GAINS
from vasa.models.face_latent import FaceLatent
from vasa.models.motion_encoder import (
    EXPRESSION_DIMS,
    EXPRESSION_UNITS,
    POSE_DIM,
    shard_pose_to_model,
    with_measured_expression,
    with_measured_pose,
)
from vasa.models.presets import LATENT_PRESETS, get_preset
from vasa.models.warping import (
    canonical_to_posed_grid,
    compose_grids,
    identity_grid,
    posed_to_canonical_grid,
    rotation_matrix,
    sample_volume,
)
from vasa.training.latent_task import LatentTask

SMALL = 32  # tests run `tiny` at 32² (volume 16 x 8 x 8 x 8): same code paths, a quarter of the cost of 64²


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def loss_cfg(**changes) -> LatentLossConfig:
    values = dict(
        l1=10.0,
        l1_scales=2,
        perceptual=0.0,
        perceptual_weights=None,
        adversarial=0.1,
        feature_matching=1.0,
        pose=1.0,
        expression=1.0,
        mouth=5.0,
        warp=1.0,
        transfer=2.0,
        cross_identity=1.0,
        identity=1.0,
        cosface_margin=0.35,
        cosface_scale=30.0,
    )
    return LatentLossConfig.from_data(values | changes)


def synthetic_batch(batch: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Smooth random images (low-frequency noise, upsampled) in [-1, 1] and plausible crop-frame poses."""
    g = torch.Generator().manual_seed(seed)

    def images() -> torch.Tensor:
        coarse = torch.rand(batch, 3, 4, 4, generator=g) * 2 - 1
        return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def poses() -> torch.Tensor:
        crop = 128
        pose = torch.zeros(batch, len(POSE_COLUMNS))
        pose[:, :3] = torch.randn(batch, 3, generator=g) * 10
        pose[:, 3:5] = crop / 2 + torch.randn(batch, 2, generator=g) * 3
        pose[:, 6] = crop * 0.25
        return pose

    return {
        "source": images(),
        "driver": images(),
        "other": images(),
        "source_pose": poses(),
        "driver_pose": poses(),
        "other_pose": poses(),
        **{f"{role}_expression": torch.rand(batch, 6, generator=g) * 0.3 for role in ("source", "driver", "other")},
        "driver_mouth": torch.tensor([[0.3, 0.6, 0.7, 0.9]]).repeat(batch, 1),
        "speaker": torch.zeros(batch, dtype=torch.int64),
        "other_speaker": torch.ones(batch, dtype=torch.int64),
    }


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- presets ---------------------------------------------------------------------------------------


def test_presets_registry_and_validation() -> None:
    assert set(LATENT_PRESETS) == {"tiny", "base"}
    assert LATENT_PRESETS["base"].volume_shape == (96, 16, 64, 64)  # MegaPortraits/EMOPortraits at 512²
    assert LATENT_PRESETS["base"].resolution == 512
    assert get_preset("tiny", 128).volume_shape == (16, 8, 32, 32)
    with pytest.raises(KeyError, match="known"):
        get_preset("huge")
    with pytest.raises(ValueError, match="not divisible"):
        get_preset("tiny", 66)
    assert json.loads(json.dumps(LATENT_PRESETS["tiny"].describe()))["name"] == "tiny"


def test_tiny_shapes_and_ranges() -> None:
    torch.manual_seed(0)
    preset = get_preset("tiny")  # 64², the size params.yaml trains on the sample corpus
    model = FaceLatent(preset, n_speakers=3)
    x = synthetic_batch(2, preset.resolution)
    with torch.no_grad():
        code = model.encode(x["source"])
        out = model(x["source"], x["driver"], x["other"], transfer=True, pose_swap=True)
    assert code.volume.shape == (2, *preset.volume_shape)
    assert code.z_id.shape == (2, preset.identity_dim)
    torch.testing.assert_close(code.z_id.norm(dim=1), torch.ones(2))
    assert code.pose.shape == (2, POSE_DIM) and code.dyn.shape == (2, preset.dynamics_dim)
    assert out["driver_dyn"].shape == (2, preset.dynamics_dim) and out["other_dyn"].shape == (2, preset.dynamics_dim)
    for key in ("recon", "cross", "transfer_a", "transfer_b", "pose_swap"):
        assert out[key].shape == (2, 3, 64, 64), key
        assert out[key].min() >= -1 and out[key].max() <= 1, key
    assert out["id_logits"].shape == (6, 3)
    assert out["id_logits"].abs().max() <= 1 + 1e-5  # cosines


def test_rendering_at_the_portrait_side_moves_its_own_pixels() -> None:
    """With a high-resolution source (generation), the decoder applies its flow and mix to that source: the
    output keeps detail the model's resolution cannot hold, and agrees with the model-side rendering."""
    torch.manual_seed(0)
    preset = get_preset("tiny").at_resolution(SMALL)
    model = FaceLatent(preset, n_speakers=2).eval()
    g = torch.Generator().manual_seed(1)
    hires = (torch.rand(1, 3, 4 * SMALL, 4 * SMALL, generator=g) * 2 - 1).clamp(-1, 1)  # pixel-level texture
    image = torch.nn.functional.interpolate(hires, size=(SMALL, SMALL), mode="area")
    with torch.no_grad():
        code = model.encode(image)
        canonical = model.canonical(code, image)
        low = model.render(canonical, code.z_id, code.pose, code.dyn)
        sharp = canonical.__class__(canonical.volume, canonical.source_grid, canonical.image, hires)
        high = model.render(sharp, code.z_id, code.pose, code.dyn)
    assert low.shape == (1, 3, SMALL, SMALL) and high.shape == (1, 3, 4 * SMALL, 4 * SMALL)
    assert high.min() >= -1 and high.max() <= 1
    down = torch.nn.functional.interpolate(high, size=(SMALL, SMALL), mode="area")
    assert (down - low).abs().mean() < 0.05  # the same picture ...
    upsampled = torch.nn.functional.interpolate(low, size=high.shape[-2:], mode="bicubic")

    def detail(x: torch.Tensor) -> float:  # mean absolute difference of neighbouring pixels
        return float((x[..., 1:, :] - x[..., :-1, :]).abs().mean())

    assert detail(high) > 3 * detail(upsampled)  # ... with the source's own texture, not an upscaled blur


def test_base_builds_at_paper_size_and_runs_small() -> None:
    preset = get_preset("base")
    generator, disc = FaceLatent(preset, n_speakers=16), MultiScaleDiscriminator(preset)
    # Reported in docs/BENCHMARKS.md; VASA-1's latent model is said to be ~200 M, MegaPortraits' is larger.
    assert 30e6 < n_params(generator) < 300e6
    assert 1e6 < n_params(disc) < 50e6
    small = preset.at_resolution(64)  # the same widths on a 8 x 8 volume side: a cheap forward
    model = FaceLatent(small, n_speakers=4)
    x = synthetic_batch(1, 64)
    with torch.no_grad():
        out = model(x["source"], x["driver"], x["other"], transfer=False)
    assert out["recon"].shape == (1, 3, 64, 64)
    assert out["recon"].abs().max() <= 1


# --- warping geometry ------------------------------------------------------------------------------


def zero_pose(batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, POSE_DIM)  # angles 0, translation 0, log scale 0


def test_identity_pose_reproduces_the_volume() -> None:
    torch.manual_seed(0)
    volume = torch.randn(2, 4, 6, 10, 12)
    grid = identity_grid(6, 10, 12, volume.device, volume.dtype).expand(2, 6, 10, 12, 3)
    for warp in (canonical_to_posed_grid, posed_to_canonical_grid):
        torch.testing.assert_close(sample_volume(volume, warp(zero_pose(2), grid)), volume, atol=1e-5, rtol=0)


def test_rotation_matches_the_pose_module_convention() -> None:
    angles = torch.tensor([[20.0, -35.0, 50.0], [-70.0, 10.0, -5.0]])
    expected = euler_to_matrix(angles[:, 0].numpy(), angles[:, 1].numpy(), angles[:, 2].numpy())
    np.testing.assert_allclose(rotation_matrix(angles).numpy(), expected, atol=1e-6)


def blob_volume(x: float, y: float, z: float, side: int = 17) -> torch.Tensor:
    """(1, 1, side, side, side) Gaussian blob centred at (x, y, z) in volume units."""
    grid = identity_grid(side, side, side, torch.device("cpu"), torch.float32)
    d2 = ((grid - torch.tensor([x, y, z])) ** 2).sum(-1)
    return torch.exp(-d2 / (2 * 0.12**2))[None, None]


def centre_of_mass(volume: torch.Tensor) -> torch.Tensor:
    """(x, y, z) centre of mass of a (1, 1, D, H, W) non-negative volume, in volume units."""
    _, _, d, h, w = volume.shape
    grid = identity_grid(d, h, w, volume.device, volume.dtype)
    weights = volume[0, 0, ..., None]
    return (grid * weights).sum((0, 1, 2)) / weights.sum()


def pose_volume(volume: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """The canonical volume rendered in `pose` (rigid part of WarpingGenerator.from_canonical)."""
    _, _, d, h, w = volume.shape
    grid = identity_grid(d, h, w, volume.device, volume.dtype)[None]
    return sample_volume(volume, posed_to_canonical_grid(pose, grid))


@pytest.mark.parametrize(
    ("angles", "start", "end"),
    [
        # roll > 0 tilts the head clockwise in the image (y down): a point at image right drops.
        ((0.0, 0.0, 90.0), (0.5, 0.0, 0.0), (0.0, 0.5, 0.0)),
        # yaw > 0: the subject turns to their right, the nose (toward the camera, z < 0) goes image left.
        ((90.0, 0.0, 0.0), (0.0, 0.0, -0.5), (-0.5, 0.0, 0.0)),
        # pitch > 0: looks down, the nose goes toward the image bottom.
        ((0.0, 90.0, 0.0), (0.0, 0.0, -0.5), (0.0, 0.5, 0.0)),
    ],
)
def test_rigid_pose_moves_a_known_pattern(angles, start, end) -> None:
    pose = zero_pose()
    pose[0, :3] = torch.tensor(angles)
    moved = centre_of_mass(pose_volume(blob_volume(*start), pose))
    torch.testing.assert_close(moved, torch.tensor(end), atol=0.03, rtol=0)


def test_translation_and_scale_move_and_grow_the_pattern() -> None:
    pose = zero_pose()
    pose[0, 3:6] = torch.tensor([0.25, -0.25, 0.0])
    pose[0, 6] = np.log(1.5)
    volume = blob_volume(0.2, 0.0, 0.0)
    moved = pose_volume(volume, pose)
    torch.testing.assert_close(centre_of_mass(moved), torch.tensor([0.2 * 1.5 + 0.25, -0.25, 0.0]), atol=0.03, rtol=0)
    assert moved.sum() / volume.sum() == pytest.approx(1.5**3, rel=0.1)  # volume grows with s³


def test_shard_pose_conversion() -> None:
    crop = 256
    pose = torch.tensor([[10.0, -5.0, 3.0, crop / 2, crop / 2 + crop / 4, 12.8, crop * 0.25]])
    model_units = shard_pose_to_model(pose, crop, canonical_scale=0.25)
    torch.testing.assert_close(model_units, torch.tensor([[10.0, -5.0, 3.0, 0.0, 0.5, 0.1, 0.0]]))


# --- training ----------------------------------------------------------------------------------------


def test_gradients_reach_every_generator_parameter() -> None:
    torch.manual_seed(0)
    task = LatentTask(loss_cfg(), get_preset("tiny", SMALL), n_speakers=2, crop_size=128)
    models = task.build()
    loss, terms = task.loss("generator", models, synthetic_batch(2, SMALL), {})
    loss.backward()
    missing = [n for n, p in models["generator"].named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # The expression field's colour shows only where its cover is > 0, and the cover starts at zero: the colour's
    # gradient is zero on the first step and not after it (test_expression_field_moves_and_covers...).
    assert missing == ["decoder.expression.colour"], f"no gradient reaches {missing}"
    assert {"l1", "pose", "transfer", "cross_identity"} <= set(terms)


CHANNELS_LAST_PROBE = """
import torch
from vasa.models.layers import ConvEncoder2d
from vasa.models.discriminator import MultiScaleDiscriminator
from vasa.models.presets import get_preset
torch.set_num_threads(1)
torch.manual_seed(0)
x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
ConvEncoder2d((8, 16))(x).square().mean().backward()
sum(logits.mean() for _, logits in MultiScaleDiscriminator(get_preset("tiny"))(x)).backward()
print("ok")
"""


def test_channels_last_frames_do_not_crash_the_backward() -> None:
    """Frames decoded HWC and permuted are channels_last; torch 2.13's CPU backward of a 1x1 stride-2 conv
    segfaults on such input at these sizes (measured: exit -11 without the guard), so the networks make
    their input NCHW-contiguous. Run in a subprocess: a crash must fail this test, not kill the session."""
    import subprocess
    import sys

    from .conftest import REPO

    done = subprocess.run([sys.executable, "-c", CHANNELS_LAST_PROBE], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])


def test_discriminator_step_needs_the_generator_fake() -> None:
    task = LatentTask(loss_cfg(), get_preset("tiny", SMALL), n_speakers=2, crop_size=128)
    models = task.build()
    batch = synthetic_batch(2, SMALL)
    with pytest.raises(RuntimeError, match="fake"):
        task.loss("discriminator", models, batch, {})
    scratch: dict = {}
    task.loss("generator", models, batch, scratch)
    loss, terms = task.loss("discriminator", models, batch, scratch)
    loss.backward()
    assert all(p.grad is not None for p in models["discriminator"].parameters())
    assert terms["hinge"] > 0


def test_task_validation_describe_and_images() -> None:
    with pytest.raises(ValueError, match="crop_size"):
        LatentTask(loss_cfg(), get_preset("tiny", SMALL), n_speakers=2)
    with pytest.raises(ValueError, match="crop_size"):  # a measured-pose model renders the shards' pose
        LatentTask(loss_cfg(pose=0.0), get_preset("tiny", SMALL), n_speakers=2)
    with pytest.raises(ValueError, match="2 train speakers"):
        LatentTask(loss_cfg(), get_preset("tiny", SMALL), n_speakers=1, crop_size=128)
    task = LatentTask(loss_cfg(), get_preset("tiny", SMALL), n_speakers=2, crop_size=128)
    info = task.describe()
    assert info == json.loads(json.dumps(info)) and info["preset"]["name"] == "tiny"
    grid = task.images(task.build(), synthetic_batch(2, SMALL))
    assert grid.dtype == np.uint8 and grid.shape == (2 * SMALL, 5 * SMALL, 3)


def test_latent_task_learns_a_fixed_batch_with_a_plain_loop() -> None:
    """A hand-written loop (AdamW per module, generator then discriminator, as the engine does) lowers the
    reconstruction loss of one fixed batch well below its start."""
    torch.manual_seed(0)
    task = LatentTask(loss_cfg(), get_preset("tiny", SMALL), n_speakers=2, crop_size=128)
    models = task.build()
    optims = {n: torch.optim.AdamW(m.parameters(), lr=2e-3, betas=(0.5, 0.999)) for n, m in models.items()}
    batch = synthetic_batch(2, SMALL, seed=1)
    history = []
    for _ in range(8):
        scratch: dict = {}
        for name in task.update_order():
            optims[name].zero_grad(set_to_none=True)
            loss, terms = task.loss(name, models, batch, scratch)
            loss.backward()
            optims[name].step()
            if name == "generator":
                history.append(float(terms["l1"]))
    assert all(np.isfinite(history))
    assert min(history[-3:]) < 0.85 * history[0], history  # measured: 0.44 -> 0.34 after 8 steps


def test_activation_checkpointing_keeps_less_for_the_backward_and_gives_the_same_gradients() -> None:
    """Params `train.activation_checkpointing`: the warping and decoder blocks recompute their activations in the
    backward pass. Autograd keeps fewer bytes for the generator loss, and every gradient is bit-identical."""
    task = LatentTask(loss_cfg(), get_preset("tiny", SMALL), n_speakers=2, crop_size=128)
    batch = synthetic_batch(2, SMALL)
    kept, grads = [], []
    for recompute in (False, True):
        torch.manual_seed(0)
        models = task.build()
        if recompute:
            assert models["generator"].checkpoint_activations() > 0
        params = {p.untyped_storage().data_ptr() for p in models["generator"].parameters()}
        saved: dict[int, int] = {}

        def keep(tensor: torch.Tensor, saved=saved, params=params) -> torch.Tensor:
            if tensor.untyped_storage().data_ptr() not in params:
                saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            loss, _ = task.loss("generator", models, batch, {})
        loss.backward()
        kept.append(sum(saved.values()))
        grads.append({n: p.grad for n, p in models["generator"].named_parameters() if p.grad is not None})
    assert kept[1] < 0.8 * kept[0], kept
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


@pytest.mark.slow  # ~15 s alone on 2 cores (Accelerate, DVCLive, checkpoints); the plain loop above is the fast path
def test_latent_task_through_the_training_engine(tmp_path) -> None:
    """Three steps of the real engine (vasa/training) with LatentTask: EMA weights load into a freshly built
    FaceLatent, every weighted loss term is logged, the grid PNG is written."""
    from vasa.core.config import TrainConfig
    from vasa.training.engine import TrainTask, train

    preset = get_preset("tiny", SMALL)
    task = LatentTask(loss_cfg(), preset, n_speakers=2, crop_size=128)
    assert isinstance(task, TrainTask)
    cfg = TrainConfig.from_data(
        {
            "steps": 3, "batch_size": 2, "grad_accum": 1, "lr": 2e-4, "betas": [0.5, 0.999], "weight_decay": 0.0,
            "warmup_steps": 1, "min_lr_ratio": 0.1, "clip_norm": 1.0, "ema_decay": 0.9, "precision": "fp32",
            "seed": 0, "log_every": 1, "image_every": 3, "checkpoint_every": 3, "keep_checkpoints": 1,
            "activation_checkpointing": False, "compile": False,
        }
    )  # fmt: skip

    def batches(epoch: int, rank: int, world: int):
        step = 0
        while True:
            yield synthetic_batch(2, SMALL, seed=epoch * 1000 + rank * 100 + step)
            step += 1

    train(task, cfg, batches, tmp_path, meta={"lineage": {}}, resume=False, progress=False)
    weights, meta = load_weights(tmp_path / "model")
    assert meta["task"] == task.describe() and meta["step"] == 3
    FaceLatent(preset, n_speakers=2).load_state_dict(weights["generator"])
    metrics = json.loads((tmp_path / "live" / "metrics.json").read_text())
    logged = set(metrics["loss"]["generator"])
    assert {"l1", "adversarial", "feature_matching", "pose", "transfer", "identity", "cross_identity"} <= logged
    assert "hinge" in metrics["loss"]["discriminator"]
    assert list((tmp_path / "images").glob("*.png"))


# --- the decoder's source-image skip path ----------------------------------------------------------


def test_composed_grid_maps_target_voxels_to_the_source_points_they_show() -> None:
    """canonical->source composed with target->canonical: with source pose P_s and target pose P_t the
    composition is P_s(P_t^-1(q)); same pose -> identity; a pure translation shifts by the difference."""
    d, h, w = 4, 8, 8
    grid = identity_grid(d, h, w, torch.device("cpu"), torch.float32)[None]
    source, target = zero_pose(), zero_pose()
    source[0, :3] = torch.tensor([10.0, -5.0, 8.0])
    target[0, :3] = source[0, :3]
    same = compose_grids(canonical_to_posed_grid(source, grid), posed_to_canonical_grid(target, grid))
    inner = (grid.abs() < 0.6).all(-1)  # away from the border, where compose_grids extends the field
    torch.testing.assert_close(same[inner], grid[inner], atol=1e-4, rtol=0)
    source, target = zero_pose(), zero_pose()
    target[0, 3:5] = torch.tensor([0.25, 0.0])  # the target head sits 0.25 right of the source's
    shifted = compose_grids(canonical_to_posed_grid(source, grid), posed_to_canonical_grid(target, grid))
    expected = grid - torch.tensor([0.25, 0.0, 0.0])  # target pixel q shows source point q - 0.25
    inner = (grid[..., 0] > -0.5) & (grid.abs() < 0.8).all(-1)
    torch.testing.assert_close(shifted[inner], expected[inner], atol=1e-4, rtol=0)


def test_skip_path_starts_near_copying_the_source_and_can_render_the_warped_source() -> None:
    torch.manual_seed(0)
    preset = get_preset("tiny")
    decoder = FaceLatent(preset, n_speakers=2).decoder
    volume = torch.randn(2, *preset.volume_shape)
    image = synthetic_batch(2, preset.resolution)["source"]
    _, d, h, w = preset.volume_shape
    points = identity_grid(d, h, w, torch.device("cpu"), torch.float32).expand(2, d, h, w, 3)
    with torch.no_grad():
        start = decoder(volume, points, image)
        # Init: the source dominates the mix (MIX_INIT_BIAS), so training starts near the copy baseline.
        assert (start - image).abs().mean() < 0.3 * (decoder(volume, points, -image) - image).abs().mean() + 1e-6
        decoder.mix.weight.zero_()
        decoder.mix.bias.copy_(torch.tensor([-30.0, 30.0, -30.0]))  # all weight on the warped source
        shift = points.clone()
        shift[..., 0] += 2 * 4 / preset.resolution  # read 4 pixels to the right
        moved = decoder(volume, shift, image)
    torch.testing.assert_close(decoder(volume, points, image), image, atol=1e-4, rtol=0)
    torch.testing.assert_close(moved[..., 8:-8, 8:-12], image[..., 8:-8, 12:-8], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="skip path"):
        decoder(volume)


def test_the_warp_term_trains_the_flow_when_the_mix_shuts_the_warp_out() -> None:
    """The collapse it guards against: a mix that gives the warped source ~0 weight passes the flow ~0
    gradient through the reconstruction; the warp term's L1 of the warped source alone still reaches it."""

    def flow_grad(warp: float) -> tuple[float, set[str]]:
        torch.manual_seed(0)
        task = LatentTask(loss_cfg(warp=warp), get_preset("tiny", SMALL), n_speakers=2, crop_size=128)
        models = task.build()
        decoder = models["generator"].decoder
        with torch.no_grad():
            decoder.mix.weight.zero_()
            decoder.mix.bias.copy_(torch.tensor([0.0, -30.0, 0.0]))  # the warped source gets e^-30 of the weight
        loss, terms = task.loss("generator", models, synthetic_batch(2, SMALL), {})
        loss.backward()
        grad = decoder.depth_weights.weight.grad
        return (0.0 if grad is None else grad.abs().sum().item()), set(terms)

    shut, terms_off = flow_grad(0.0)
    trained, terms_on = flow_grad(1.0)
    assert "warp" not in terms_off and "warp" in terms_on
    assert shut < 1e-6 < trained, (shut, trained)


def test_expression_field_moves_and_covers_only_with_a_change_of_expression() -> None:
    """No expression change: the decoder's output is what it was without the field. A learned downward
    displacement under a mouth-opening change moves the source's pixels at the canonical points it was
    set on, and a cover paints the field's colour there; both scale with the change."""
    torch.manual_seed(0)
    preset = get_preset("tiny")
    decoder = FaceLatent(preset, n_speakers=2).decoder
    assert decoder.expression is not None
    volume = torch.randn(2, *preset.volume_shape)
    image = synthetic_batch(2, preset.resolution)["source"]
    _, d, h, w = preset.volume_shape
    points = identity_grid(d, h, w, torch.device("cpu"), torch.float32).expand(2, d, h, w, 3)
    change = torch.zeros(2, EXPRESSION_DIMS)
    field = decoder.expression
    with torch.no_grad():
        decoder.mix.weight.zero_()
        decoder.mix.bias.copy_(torch.tensor([-30.0, -30.0, 30.0]))  # all weight on the (expression-moved) source
        plain = decoder(volume, points, image)
        # measure 0 (channels: x, y per measure): read 4 px lower, everywhere
        field.displacement[:, 1] = 2 * 4 / preset.resolution / GAINS["displacement"]
        torch.testing.assert_close(
            decoder(volume, points, image, canonical_points=points, expression_change=change), plain
        )
        change[:, 0] = 1.0
        moved = decoder(volume, points, image, canonical_points=points, expression_change=change)
        torch.testing.assert_close(moved[..., 8:-12, 8:-8], image[..., 12:-8, 8:-8], atol=1e-4, rtol=0)
        half = decoder(volume, points, image, canonical_points=points, expression_change=change / 2)
        torch.testing.assert_close(half[..., 8:-10, 8:-8], image[..., 10:-8, 8:-8], atol=1e-4, rtol=0)
        field.cover[:, 0] = 1.0 / GAINS["cover"]
        field.colour[:] = -10.0  # tanh -> -1: black
        covered = decoder(volume, points, image, canonical_points=points, expression_change=change)
        torch.testing.assert_close(covered, torch.full_like(covered, -1.0))
    # Gradients reach the fields from a reconstruction loss: zero init is not a dead start (the colour
    # learns once some cover shows it, and the cover's gradient does not need the colour).
    with torch.no_grad():
        field.displacement.zero_()
        field.cover.zero_()
        field.colour.zero_()
    for name in ("displacement", "cover", "colour"):
        field.zero_grad()
        out = decoder(volume, points, image, canonical_points=points, expression_change=change)
        (out - image.flip(-2)).abs().mean().backward()
        assert getattr(field, name).grad.abs().sum() > 0, name
        with torch.no_grad():
            getattr(field, name).add_(0.01)


def test_measured_expression_replaces_the_estimate_in_units_except_where_unmeasured() -> None:
    dyn = torch.randn(3, 32)
    measured = torch.tensor([EXPRESSION_UNITS, [2 * u for u in EXPRESSION_UNITS], [float("nan")] * EXPRESSION_DIMS])
    out = with_measured_expression(dyn, measured)
    torch.testing.assert_close(out[0, :EXPRESSION_DIMS], torch.ones(EXPRESSION_DIMS))
    torch.testing.assert_close(out[1, :EXPRESSION_DIMS], torch.full((EXPRESSION_DIMS,), 2.0))
    torch.testing.assert_close(out[2], dyn[2])  # no landmarks: the encoder's estimate stays
    torch.testing.assert_close(out[:, EXPRESSION_DIMS:], dyn[:, EXPRESSION_DIMS:])


def test_measured_pose_replaces_the_estimate_except_where_unmeasured() -> None:
    pose = torch.randn(3, POSE_DIM)
    measured = torch.tensor([[5.0, -3.0, 1.0, 0.1, -0.1, 0.0, 0.2], [float("nan")] * POSE_DIM, [1.0] * POSE_DIM])
    out = with_measured_pose(pose, measured)
    torch.testing.assert_close(out[[0, 2]], measured[[0, 2]])
    torch.testing.assert_close(out[1], pose[1])  # no landmarks: the encoder's estimate stays


def test_a_measured_pose_model_renders_from_the_measured_pose_and_returns_its_own_estimate() -> None:
    """forward(poses=...) renders every face at the given head pose (the shards', in z_pose units), while the
    returned *_pose stay the encoder's (what the pose loss supervises); a model without the flag ignores them."""
    torch.manual_seed(0)
    preset = get_preset("tiny", SMALL)
    assert preset.measured_pose
    face = FaceLatent(preset, n_speakers=2).eval()
    batch = synthetic_batch(2, SMALL)
    task = LatentTask(loss_cfg(), preset, n_speakers=2, crop_size=128)
    poses = task._poses(batch)
    assert poses is not None
    torch.testing.assert_close(poses[1], shard_pose_to_model(batch["driver_pose"], 128, preset.canonical_scale))
    with torch.no_grad():
        plain = face(batch["source"], batch["driver"], batch["other"], transfer=False)
        given = face(batch["source"], batch["driver"], batch["other"], transfer=False, poses=poses)
        # The same rendering as measured() + render() by hand: the pose used is the measured one.
        src = face.measured(face.encode(batch["source"]), None, poses[0])
        drv = face.measured(face.encode(batch["driver"], appearance=False), None, poses[1])
        by_hand = face.render(face.canonical(src, batch["source"]), src.z_id, drv.pose, drv.dyn)
    torch.testing.assert_close(given["driver_pose"], plain["driver_pose"])  # the encoder's own estimate
    torch.testing.assert_close(drv.pose, poses[1])
    torch.testing.assert_close(given["recon"], by_hand)
    assert (given["recon"] - plain["recon"]).abs().max() > 1e-3
    other = FaceLatent(dataclasses.replace(preset, measured_pose=False), n_speakers=2).eval()
    other.load_state_dict(face.state_dict())
    with torch.no_grad():
        ignored = other(batch["source"], batch["driver"], batch["other"], transfer=False, poses=poses)
    torch.testing.assert_close(ignored["recon"], plain["recon"])


def test_the_identity_judge_passes_gradients_to_the_image_only():
    """The stop-gradient judge: the generator (the image) gets gradients, the identity encoder none, and its
    parameters are trainable again afterwards (the same call is the CosFace encoder's elsewhere)."""
    torch.manual_seed(0)
    face = FaceLatent(get_preset("tiny"), n_speakers=2)
    image = torch.rand(2, 3, 64, 64, requires_grad=True)
    face.judge_identity(image).square().sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert all(p.grad is None for p in face.identity.parameters())
    assert all(p.requires_grad for p in face.identity.parameters())
    face.identity(image).square().sum().backward()
    assert all(p.grad is not None for p in face.identity.parameters())
