"""The portrait's crop at its own resolution (vasa/inference/portrait.py `native_crop`): an exact sub-window
at scale 1 that paste-back returns by a whole-pixel shift, so the still parts of the face keep every pixel
of the portrait (a 0.5 % scale at a fractional offset had cost a grainy portrait 77 % of its sharpness)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from preprocessing.sample.portraits import _grace_hopper
from vasa.evaluation.independent import sharpness_ratio
from vasa.inference.portrait import Paster, native_crop, prepare_portrait


@pytest.mark.parametrize(("native", "side"), [(221, 222), (220, 220), (64, 64)])
def test_a_box_that_fits_is_cropped_at_scale_one_and_even(native, side):
    transform = np.array([[64 / native, 0.0, -23 * 64 / native], [0.0, 64 / native, -18 * 64 / native]])
    got_side, full = native_crop(transform, 64, 1024)
    assert got_side == side
    np.testing.assert_array_equal(full, [[1, 0, -23], [0, 1, -18]])


def test_a_box_out_of_range_is_resampled_to_the_nearest_allowed_side():
    transform = np.array([[64 / 2000, 0.0, 0.0], [0.0, 64 / 2000, 0.0]])  # a 2000-px face, max side 1024
    side, full = native_crop(transform, 64, 1024)
    assert side == 1024
    np.testing.assert_allclose(full, transform * 1024 / 64)


def test_paste_back_of_the_unchanged_crop_returns_the_portrait(params, tmp_path: Path):
    """grace_hopper at 252²: its box is 167 px, an odd side, so the crop is 168 px at scale 1 (it used to be
    168 px at scale 1.006: on the demo's grace_hopper frame, 220 px at 0.995, pasting the unchanged crop back
    kept 0.23 of the portrait's face sharpness)."""
    image = cv2.resize(_grace_hopper(), (252, 252), interpolation=cv2.INTER_AREA)
    path = tmp_path / "portrait.png"
    cv2.imwrite(str(path), image[:, :, ::-1])
    portrait = prepare_portrait(path, 64, params.preprocess.crop_size, params.preprocess.face, 1024)
    linear, offset = portrait.full_transform[:, :2], portrait.full_transform[:, 2]
    np.testing.assert_array_equal(linear, np.eye(2))
    assert np.array_equal(offset, np.round(offset))
    x0, y0 = (-offset).astype(int)
    side = portrait.crop_full.shape[0]
    assert side == 168
    inside = portrait.frame[max(y0, 0) : y0 + side, max(x0, 0) : x0 + side]
    np.testing.assert_array_equal(
        portrait.crop_full[max(-y0, 0) : max(-y0, 0) + inside.shape[0], max(-x0, 0) : max(-x0, 0) + inside.shape[1]],
        inside,
    )
    pasted = Paster(portrait, params.generate.feather)(portrait.crop_full[None].repeat(3, axis=0))
    np.testing.assert_array_equal(pasted, np.repeat(portrait.frame[None], 3, axis=0))
    assert sharpness_ratio(pasted, portrait.frame, params.preprocess.face) == pytest.approx(1.0, abs=0.01)
