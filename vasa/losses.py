"""Stage-1 losses (VASA-1 §3.1 on top of the MegaPortraits set): reconstruction, perceptual,
adversarial + feature matching, head-pose supervision, pairwise transfer consistency, cross-identity
and the CosFace identity loss. Pure functions of tensors, plus the hand-written VGG19 feature network.

Images are (B, 3, S, S) in [-1, 1] throughout.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from vasa.core.errors import InputError

# torchvision's vgg19 `features` layout, so a converted torchvision state dict loads by key
# ("features.<index>.weight"). "M" = 2x2 max pool. Perceptual features are taken after relu1_1,
# relu2_1, relu3_1, relu4_1 and relu5_1 (indices 1, 6, 11, 20, 29), as in pix2pixHD / MegaPortraits.
VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512)
VGG19_TAPS = (1, 6, 11, 20, 29)
VGG19_TAP_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)  # pix2pixHD's weighting: deep layers count most
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGG19Features(nn.Module):
    """VGG19 convolutional trunk up to relu5_1: (B, 3, S, S) in [-1, 1] -> five ReLU feature maps."""

    mean: torch.Tensor  # buffers registered in __init__
    std: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in VGG19_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                assert isinstance(v, int)  # every other VGG19_LAYOUT entry is a channel count
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        h = ((image + 1) / 2 - self.mean) / self.std
        taps = []
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in VGG19_TAPS:
                taps.append(h)
        return taps


def load_vgg19(path: str | Path) -> VGG19Features:
    """VGG19Features with weights from a local safetensors file (torchvision key names, extra keys ignored).

    Frozen (no gradients, eval mode). Raises InputError naming the file when it is missing or a key
    or shape does not fit, never downloads.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"perceptual network weights not found: {path}")
    net = VGG19Features()
    state = load_file(str(path))
    wanted = net.state_dict()
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise InputError(f"{path}: not VGG19 features weights, {len(missing)} keys missing, e.g. {missing[:4]}")
    wrong = [k for k in wanted if tuple(state[k].shape) != tuple(wanted[k].shape)]
    if wrong:
        raise InputError(f"{path}: wrong shapes for {wrong[:4]} (expected VGG19 `features`)")
    net.load_state_dict({k: state[k].float() for k in wanted})
    net.requires_grad_(False)
    return net.eval()


def perceptual_loss(vgg: VGG19Features, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Weighted L1 between VGG19 features of fake and real (real detached): a scalar >= 0."""
    with torch.no_grad():
        real_feats = vgg(real)
    # A sum over the (five) taps: a Tensor, never sum()'s start value 0.
    return cast(
        torch.Tensor, sum(w * F.l1_loss(f, r) for w, f, r in zip(VGG19_TAP_WEIGHTS, vgg(fake), real_feats, strict=True))
    )


def multiscale_l1(fake: torch.Tensor, real: torch.Tensor, scales: int) -> torch.Tensor:
    """Mean over `scales` of the L1 at full, 1/2, 1/4, ... resolution (average pooling): scalar >= 0."""
    total = fake.new_zeros(())
    for k in range(scales):
        if k:
            fake, real = F.avg_pool2d(fake, 2), F.avg_pool2d(real, 2)
        total = total + F.l1_loss(fake, real)
    return total / scales


def hinge_discriminator_loss(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """Hinge loss of a multi-scale discriminator: mean relu(1 - D(real)) + relu(1 + D(fake)), summed over scales."""
    # Over a discriminator's (non-empty) scales: a Tensor, never sum()'s start value 0.
    return cast(
        torch.Tensor,
        sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real_logits, fake_logits, strict=True)),
    )


def hinge_generator_loss(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """Generator side of the hinge game: -mean D(fake), summed over scales (can be negative)."""
    return cast(torch.Tensor, sum(-f.mean() for f in fake_logits))  # non-empty scales: a Tensor, not 0


def feature_matching_loss(real_feats: list[list[torch.Tensor]], fake_feats: list[list[torch.Tensor]]) -> torch.Tensor:
    """L1 between discriminator features of real (detached) and fake, averaged over layers, summed over scales."""
    total: torch.Tensor | float = 0.0
    for real_scale, fake_scale in zip(real_feats, fake_feats, strict=True):
        total = total + sum(F.l1_loss(f, r.detach()) for r, f in zip(real_scale, fake_scale, strict=True)) / len(
            real_scale
        )
    return cast(torch.Tensor, total)  # non-empty scales: a Tensor, not the 0.0 start


def cosface_loss(cosines: torch.Tensor, labels: torch.Tensor, margin: float, scale: float) -> torch.Tensor:
    """CosFace (large-margin cosine) loss: cross-entropy of scale * (cos - margin at the true class).

    cosines (N, n_speakers) in [-1, 1], labels (N,) int64 speaker indices -> scalar >= 0.
    """
    target = F.one_hot(labels, cosines.shape[1]).to(cosines.dtype)
    return F.cross_entropy(scale * (cosines - margin * target), labels)


def cross_identity_loss(judged_id: torch.Tensor, source_id: torch.Tensor) -> torch.Tensor:
    """1 - cosine between the judge's z_id of a cross-identity rendering and the source's z_id (detached).

    (B, I) each -> scalar in [0, 2]; zero when the rendering keeps the source identity exactly.
    """
    return (1 - F.cosine_similarity(judged_id, source_id.detach(), dim=-1)).mean()


def transfer_consistency_loss(transfer_a: torch.Tensor, transfer_b: torch.Tensor) -> torch.Tensor:
    """VASA-1's pairwise pose/dynamics transfer loss: L1 between the two renderings that share pose_i and dyn_j."""
    return F.l1_loss(transfer_a, transfer_b)


def pose_supervision_loss(predicted: torch.Tensor, target: torch.Tensor, angle_unit_deg: float) -> torch.Tensor:
    """L1 between predicted and measured z_pose (B, 7) in model units, angles divided by `angle_unit_deg`.

    Plain L1, not smooth-L1 with its default beta = 1: every column is well below 1 in these units (angles
    ~0.2, translation and log scale ~0.05), where smooth-L1 is quadratic and its gradient vanished
    (measured: held-out pose error stayed at the spread of the labels after 250 steps)."""
    unit = predicted.new_tensor([angle_unit_deg] * 3 + [1.0] * (predicted.shape[1] - 3))
    return F.l1_loss(predicted / unit, target / unit)


def region_l1(fake: torch.Tensor, real: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """L1 inside one box per sample: fake, real (B, 3, S, S); boxes (B, 4) x0, y0, x1, y1 as fractions of the
    side. The mean over the boxes' pixels, so a small region (the mouth: ~2-5 % of a face crop) weighs as
    much as a whole-image term: a model that never opens the mouth can no longer score well."""
    mask = box_mask(boxes, fake)
    return ((fake - real).abs() * mask).sum() / (mask.sum() * fake.shape[1]).clamp_min(1.0)


def box_mask(boxes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) 1 inside one box per sample, boxes (B, 4) x0, y0, x1, y1 as fractions of the side of `like`
    (B, C, S, S), else 0; `like`'s dtype and device."""
    side = like.shape[-1]
    axis = (torch.arange(side, device=like.device, dtype=like.dtype) + 0.5) / side  # pixel centres
    inside_x = (axis[None] >= boxes[:, 0:1]) & (axis[None] <= boxes[:, 2:3])  # (B, S)
    inside_y = (axis[None] >= boxes[:, 1:2]) & (axis[None] <= boxes[:, 3:4])
    return (inside_y[:, :, None] & inside_x[:, None, :]).to(like.dtype)[:, None]


def expression_supervision_loss(
    dyn: torch.Tensor, expression: torch.Tensor, units: tuple[float, ...], source: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """L1 between the first E dims of z_dyn (B, Z) and the measured expression (B, E) / `units` (E,), plus
    the same between the change from a source frame of the same clip, `source` = (its z_dyn, its expression):
    the absolute term fixes the scale, the relative one the within-clip motion that animation is made of
    (alone, the absolute term was met by a constant: the clip mean)."""
    unit = expression.new_tensor(units)
    e = expression.shape[1]
    source_dyn, source_expression = source
    absolute = F.l1_loss(dyn[:, :e], expression / unit)
    relative = F.l1_loss(dyn[:, :e] - source_dyn[:, :e], (expression - source_expression) / unit)
    return absolute + relative
