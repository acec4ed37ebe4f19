"""Stage-1 losses: each is zero where it must be and positive (with the right gradients) where it must not."""

from __future__ import annotations

import logging

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from vasa.core.errors import InputError
from vasa.losses import (
    VGG19Features,
    cosface_loss,
    cross_identity_loss,
    expression_supervision_loss,
    feature_matching_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    load_vgg19,
    multiscale_l1,
    perceptual_loss,
    pose_supervision_loss,
    region_l1,
    transfer_consistency_loss,
)
from vasa.models.presets import get_preset
from vasa.training.latent_task import LatentTask

from .test_latent_model import SMALL, loss_cfg, synthetic_batch


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def images(seed: int, batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A VGG19 `features` state dict with torchvision key names (random weights: no download here)."""
    torch.manual_seed(0)
    state = {f"features.{k}": v.contiguous() for k, v in VGG19Features().features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)  # a full torchvision vgg19 file carries extra keys
    path = tmp_path_factory.mktemp("vgg") / "vgg19.safetensors"
    save_file(state, str(path))
    return str(path)


def test_multiscale_l1() -> None:
    a, b = images(0), images(1)
    assert multiscale_l1(a, a, 3) == 0
    assert multiscale_l1(a, b, 1) == pytest.approx((a - b).abs().mean().item())
    assert multiscale_l1(a, b, 3) > 0
    shifted = a + 0.5
    assert multiscale_l1(shifted, a, 3) == pytest.approx(0.5, rel=1e-5)  # a constant offset survives pooling


def test_hinge_losses() -> None:
    confident_real, confident_fake = [torch.full((2, 1, 4, 4), 1.5)], [torch.full((2, 1, 4, 4), -2.0)]
    assert hinge_discriminator_loss(confident_real, confident_fake) == 0
    assert hinge_discriminator_loss(confident_fake, confident_real) == pytest.approx(3.0 + 2.5)
    two_scales = [torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 2, 2)]
    assert hinge_discriminator_loss(two_scales, two_scales) == pytest.approx(4.0)  # (1 + 1) per scale
    assert hinge_generator_loss(confident_fake) == pytest.approx(2.0)
    assert hinge_generator_loss(confident_real) == pytest.approx(-1.5)


def test_feature_matching_zero_on_equal_features_and_no_gradient_to_real() -> None:
    real = [[torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 8, 4, 4, requires_grad=True)]]
    assert feature_matching_loss(real, [[f.detach().clone() for f in real[0]]]) == 0
    fake = [[f.detach() + 1.0 for f in real[0]]]
    for f in fake[0]:
        f.requires_grad_(True)
    loss = feature_matching_loss(real, fake)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert all(f.grad is not None for f in fake[0]) and all(r.grad is None for r in real[0])


def test_cosface_loss() -> None:
    cos = torch.tensor([[0.9, -0.2, 0.1], [-0.3, 0.8, 0.0]])
    right, wrong = torch.tensor([0, 1]), torch.tensor([2, 2])
    low = cosface_loss(cos, right, margin=0.0, scale=30.0)
    assert low < 1e-6 * 1e3 and low < cosface_loss(cos, wrong, margin=0.0, scale=30.0)
    assert cosface_loss(cos, right, margin=0.35, scale=30.0) > low  # the margin asks for more than a win


def test_cross_identity_and_transfer_and_pose() -> None:
    z = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    assert cross_identity_loss(z, z) == pytest.approx(0.0, abs=1e-6)
    assert cross_identity_loss(-z, z) == pytest.approx(2.0)
    source = z.clone().requires_grad_(True)
    cross_identity_loss(z.clone().requires_grad_(True) * 0.5 + 0.1, source).backward()
    assert source.grad is None  # the source identity is the target, never pulled toward the rendering
    a, b = images(2), images(3)
    assert transfer_consistency_loss(a, a) == 0 and transfer_consistency_loss(a, b) > 0
    pose = torch.randn(2, 7)
    assert pose_supervision_loss(pose, pose, 30.0) == 0
    off_by_3_deg = pose.clone()
    off_by_3_deg[:, 0] += 3.0
    assert pose_supervision_loss(off_by_3_deg, pose, 30.0) == pytest.approx(0.1 / 7, rel=1e-4)  # 3° / 30°, 1 of 7
    # L1, not a quadratic: a 0.3° error gets the full gradient 1 / (unit * B * 7), as a 3° one does.
    small = pose.clone().requires_grad_(True)
    pose_supervision_loss(small + torch.tensor([0.3, 0, 0, 0, 0, 0, 0]), pose, 30.0).backward()
    assert small.grad[0, 0] == pytest.approx(1 / (30.0 * 14), rel=1e-4)


def test_perceptual_network_loads_from_safetensors(vgg_file: str, tmp_path) -> None:
    vgg = load_vgg19(vgg_file)
    assert all(not p.requires_grad for p in vgg.parameters()) and not vgg.training
    a, b = images(4), images(5)
    assert perceptual_loss(vgg, a, a) == 0
    fake = b.clone().requires_grad_(True)
    loss = perceptual_loss(vgg, fake, a)
    assert loss > 0
    loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    with pytest.raises(InputError, match="not found"):
        load_vgg19(tmp_path / "absent.safetensors")
    save_file({"features.0.weight": torch.zeros(64, 3, 3, 3)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(InputError, match="missing"):
        load_vgg19(tmp_path / "partial.safetensors")
    state = {f"features.{k}": v for k, v in VGG19Features().features.state_dict().items()}
    state["features.0.weight"] = torch.zeros(32, 3, 3, 3)
    save_file(state, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(InputError, match="wrong shapes"):
        load_vgg19(tmp_path / "wrong.safetensors")


def test_task_uses_perceptual_weights_or_logs_that_it_is_off(vgg_file: str, caplog) -> None:
    preset = get_preset("tiny", SMALL)
    batch = synthetic_batch(2, SMALL)
    cheap = dict(adversarial=0.0, feature_matching=0.0, transfer=0.0, pose=0.0)
    with_vgg = LatentTask(loss_cfg(perceptual=10.0, perceptual_weights=vgg_file, **cheap), preset, 2, crop_size=128)
    _, terms = with_vgg.loss("generator", with_vgg.build(), batch, {})
    assert terms["perceptual"] > 0
    assert "adversarial" not in terms and "transfer" not in terms  # zero weight: not computed
    with caplog.at_level(logging.WARNING, logger="vasa.training.latent_task"):
        without = LatentTask(loss_cfg(perceptual=10.0, perceptual_weights=None, **cheap), preset, 2, crop_size=128)
    assert sum("perceptual loss is off" in r.getMessage() for r in caplog.records) == 1
    _, terms = without.loss("generator", without.build(), batch, {})
    assert "perceptual" not in terms


def test_loss_config_validation() -> None:
    with pytest.raises(ValidationError, match="identity"):
        loss_cfg(cross_identity=1.0, identity=0.0)
    with pytest.raises(ValidationError):
        loss_cfg(l1=-1.0)
    with pytest.raises(ValidationError):
        loss_cfg(cosface_margin=1.5)


def test_region_l1_weighs_only_the_box_and_as_much_as_a_whole_image() -> None:
    real = torch.zeros(2, 3, 16, 16)
    fake = real.clone()
    fake[:, :, 12:, :] = 0.5  # a change in the bottom quarter (the mouth's rows)
    mouth = torch.tensor([[0.0, 0.75, 1.0, 1.0], [0.0, 0.75, 1.0, 1.0]])
    eyes = torch.tensor([[0.0, 0.0, 1.0, 0.25], [0.0, 0.0, 1.0, 0.25]])
    assert region_l1(fake, real, mouth) == pytest.approx(0.5)  # the box's own mean, not diluted by the crop
    assert region_l1(fake, real, eyes) == pytest.approx(0.0)
    assert torch.nn.functional.l1_loss(fake, real) == pytest.approx(0.125)


def test_expression_supervision_uses_the_first_dims_in_units_and_the_change_from_the_source() -> None:
    units = (0.1, 0.1, 0.1, 0.1, 0.1, 0.1)
    expression = torch.zeros(2, 6)
    expression[:, 0] = 0.2  # mouth_open 0.2 = 2 units
    source_expression = torch.zeros(2, 6)
    source_expression[:, 0] = 0.1
    dyn, source_dyn = torch.zeros(2, 8), torch.zeros(2, 8)
    dyn[:, 0], source_dyn[:, 0] = 2.0, 1.0
    assert expression_supervision_loss(dyn, expression, units, (source_dyn, source_expression)) == pytest.approx(0.0)
    # a constant code (the clip mean) meets neither the absolute value nor the change
    flat = torch.full((2, 8), 1.5)
    assert expression_supervision_loss(flat, expression, units, (flat, source_expression)) == pytest.approx(
        (0.5 + 5 * 1.5) / 6 + 1.0 / 6  # absolute: every dim off; relative: the mouth's change missed
    )
