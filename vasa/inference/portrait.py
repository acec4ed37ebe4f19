"""The portrait side of generation: find the face, place the shards' crop on it, measure its conditions,
and blend rendered crops back into it (vasa/inference/generate.py runs these)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from preprocessing import face as face_mod
from preprocessing import pose as pose_mod
from vasa.core.config import FaceConfig
from vasa.core.errors import InputError
from vasa.models.motion_dit import EMOTION_COLUMNS

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
# Pixels a portrait may declare, checked from its header before anything is decoded: 100 MP is above every
# phone and most camera photos (12-50 MP) and decodes to 300 MB of RGB; a 74-byte PNG can claim 60000^2.
MAX_PIXELS = 100_000_000
# Grey modes wider than 8 bits: RGB conversion would clip them (a 16-bit grey portrait came out white).
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


@dataclass
class Portrait:
    """A prepared portrait: the frame to paste into, the crop transform and the measured conditions."""

    frame: np.ndarray  # (H, W, 3) uint8 RGB, H and W even, longer side <= max_side
    transform: np.ndarray  # (2, 3) frame pixels -> crop pixels (crop side = crop_size)
    crop: np.ndarray  # (S, S, 3) uint8 model-resolution crop
    crop_full: np.ndarray  # (R, R, 3) uint8 the same crop at the portrait's own resolution (the pixels the warp moves)
    full_transform: np.ndarray  # (2, 3) frame pixels -> crop_full pixels
    gaze: np.ndarray  # (2,) degrees, theta/phi, as the shards measure it
    distance: float  # log(crop_size / scale_px), as extract_motion computes it
    emotion: np.ndarray  # (E,) EMOTION_COLUMNS of the expression descriptor
    faces: int  # faces FaceMesh found (the largest is used)
    expression: np.ndarray  # (len(EXPRESSION_COLUMNS),) the whole expression descriptor, template units
    pose: np.ndarray | None = None  # (7,) head pose, POSE_COLUMNS in crop pixels (crop side = crop_size), as the shards


def read_portrait(path: Path, max_side: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, upright (its EXIF orientation applied, as viewers show it),
    reduced so the longer side is at most max_side, even sides. Any mode and bit depth becomes 8-bit RGB
    (`to_rgb`); more than MAX_PIXELS is refused from the header, before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS is the limit here
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise InputError(f"{path}: {width}x{height} pixels is over the portrait limit of {MAX_PIXELS:,}")
                image.load()
                rgb = to_rgb(ImageOps.exif_transpose(image))
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: portrait not found") from None
    except Image.DecompressionBombError as err:  # Pillow's own check, above MAX_PIXELS: a header claiming more
        raise InputError(f"{path}: over the portrait limit of {MAX_PIXELS:,} pixels ({err})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:  # Pillow's decode errors
        raise InputError(f"{path}: not a readable image ({err})") from None
    scale = min(1.0, max_side / max(rgb.size))
    width, height = (max(2, int(round(side * scale)) // 2 * 2) for side in rgb.size)
    if (width, height) != rgb.size:
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8).copy()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: 16-bit grey scaled by 1/257, 32-bit integer or float grey scaled from its
    own range (float in [0, 1] as it is), transparency composited over white (as a viewer shows it), others
    through Pillow's conversion (palette, CMYK, 1-bit, LA...)."""
    if image.mode in _WIDE_GREY:
        grey = np.nan_to_num(np.asarray(image, dtype=np.float64))
        low, high = float(grey.min(initial=0.0)), float(grey.max(initial=0.0))
        if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
            low, high = 0.0, 65535.0
        elif image.mode == "F" and low >= 0 and high <= 1:
            low, high = 0.0, 1.0
        scaled = np.clip((grey - low) / max(high - low, 1e-12) * 255, 0, 255).round().astype(np.uint8)
        return Image.fromarray(scaled, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def largest_face(detections: np.ndarray, count: int) -> np.ndarray:
    """(478, 3) landmarks of the largest of `count` detections (2, 478, 3) NaN-padded."""
    boxes = face_mod.landmark_boxes(detections[:count])  # (n, 4) x0, y0, x1, y1
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return detections[int(np.nanargmax(areas))]


def prepare_portrait(path: Path, resolution: int, crop_size: int, face_cfg: FaceConfig, max_side: int) -> Portrait:
    """Detect the face, place the shards' box crop on it and measure gaze, distance and emotion."""
    frame = read_portrait(path, max_side)
    tracker = face_mod.get_tracker(face_cfg)
    detections, counts = _detect(tracker, frame)
    faces = int(counts[0])
    if faces == 0:
        raise InputError(f"{path}: no face found in the portrait")
    landmarks = largest_face(detections[0], faces)
    if faces > 1:
        log.warning("%s: %d faces found; animating the largest", path, faces)
    transform = face_mod.box_transform(
        landmarks[None], crop_size, face_cfg.crop_scale, (frame.shape[0], frame.shape[1])
    )
    side, full_transform = native_crop(transform, crop_size, max_side)
    transform = full_transform * (crop_size / side)  # the model's crop: the same box (one pixel wider at most)
    crop_full = face_mod.crop_frame(frame, full_transform, side)
    crop = cv2.resize(crop_full, (resolution, resolution), interpolation=cv2.INTER_AREA)
    in_crop = face_mod.transform_points(landmarks[None], transform[None])  # (1, 478, 3) crop pixels
    head = pose_mod.head_pose(in_crop)
    gaze = pose_mod.gaze(in_crop, head)[0]
    expression = pose_mod.expression(in_crop, head)[0]
    columns = [pose_mod.EXPRESSION_COLUMNS.index(c) for c in EMOTION_COLUMNS]
    return Portrait(
        frame=frame,
        transform=transform,
        crop=np.ascontiguousarray(crop),
        crop_full=np.ascontiguousarray(crop_full),
        full_transform=full_transform,
        gaze=np.nan_to_num(gaze).astype(np.float32),
        distance=float(np.log(crop_size / head.scale[0])),
        emotion=expression[columns].astype(np.float32),
        faces=faces,
        expression=expression.astype(np.float32),
        pose=pose_columns(head)[0],
    )


def pose_columns(head: pose_mod.Pose) -> np.ndarray:
    """(T, 7) float32 head pose in POSE_COLUMNS order, as the shards store it (preprocessing/process.py)."""
    return np.column_stack([head.yaw, head.pitch, head.roll, head.translation, head.scale]).astype(np.float32)


def native_crop(transform: np.ndarray, crop_size: int, max_side: int) -> tuple[int, np.ndarray]:
    """(side, frame -> crop_full transform) of the crop at the portrait's own resolution.

    `transform` is the shards' box crop (axis-aligned, whole-pixel corner and side: face.box_transform).
    Where that box's side fits [crop_size, max_side], crop_full is the box itself at scale 1, widened by
    one pixel when its side is odd (videos need even sides): an exact sub-window, which paste-back puts
    back by a whole-pixel shift. Any other scale resamples twice (crop, then the inverse warp of the
    paste), and a 0.5 % scale at a fractional offset already took 77 % of the Laplacian variance of a
    grainy 256² portrait (docs/BENCHMARKS.md, "A face that talks"). Outside that range the side is
    clamped to it and the crop is resampled.
    """
    x0, y0, native = face_mod.box_of(transform, crop_size)
    side = native + native % 2
    if crop_size <= side <= max_side:
        return side, np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0]])
    side = max(crop_size, min(side, max_side // 2 * 2))
    return side, transform * (side / crop_size)


def _detect(tracker: face_mod.FaceMeshTracker, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tracker.reset()  # a still image: detection from scratch, no state from an earlier clip
    return tracker.detect(frame[None])


class Paster:
    """Blends rendered crops back into the portrait through the inverse crop transform, with a feathered
    edge, at the portrait crop's own side (`Portrait.crop_full`): crops rendered at that side are placed
    without any resize. The mask and its warp are computed once per portrait; only the mask's bounding box
    is blended, in uint8 by OpenCV's `blendLinear` (float weights, one rounding per pixel): within one grey
    level of the float32 blend `alpha * crop + (1 - alpha) * portrait` (its weights are divided by their
    sum + 1e-5; 0.1 % of the pixels differ, by 1) at a tenth of its CPU (docs/BENCHMARKS.md)."""

    def __init__(self, portrait: Portrait, feather: float) -> None:
        height, width = portrait.frame.shape[:2]
        crop_size = portrait.crop_full.shape[0]
        self.portrait, self.crop_size = portrait, crop_size
        self.inverse = cv2.invertAffineTransform(portrait.full_transform)
        ramp = max(1, int(round(feather * crop_size)))
        mask: np.ndarray = np.zeros((crop_size, crop_size), np.float32)
        mask[ramp:-ramp, ramp:-ramp] = 1.0
        mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=ramp / 2) if ramp > 1 else mask
        # OpenCV's stubs type the Scalar borderValue as a Sequence only; a number is a valid Scalar.
        alpha = cv2.warpAffine(mask, self.inverse, (width, height), flags=cv2.INTER_LINEAR, borderValue=0.0)  # type: ignore[call-overload]
        rows, cols = np.nonzero(alpha > 0)
        if len(rows) == 0:
            raise InputError("the face crop lies outside the portrait")
        self.box = (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)
        top, bottom, left, right = self.box
        self.alpha = np.ascontiguousarray(alpha[top:bottom, left:right])  # (h, w) float32 in [0, 1]
        self.rest = 1 - self.alpha  # the portrait's weight
        self.base = np.ascontiguousarray(portrait.frame[top:bottom, left:right])  # (h, w, 3) uint8
        # The crop -> portrait warp, shifted so it writes straight into the box.
        self.warp = self.inverse - np.array([[0, 0, left], [0, 0, top]], dtype=np.float64)
        self.window = _integer_window(self.warp, crop_size, (bottom - top, right - left))
        self._placed = np.empty_like(self.base)  # the warped crop, when the warp is not a whole-pixel shift

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        """(T, S, S, 3) uint8 crops -> (T, H, W, 3) uint8 frames."""
        top, bottom, left, right = self.box
        out = np.repeat(self.portrait.frame[None], len(crops), axis=0)
        for index, crop in enumerate(crops):
            self.blend_into(crop, out[index, top:bottom, left:right])  # a view: written straight into the frame
        return out

    def blend_into(self, crop: np.ndarray, box: np.ndarray) -> None:
        """Blend one (S, S, 3) uint8 crop into `box`, a (h, w, 3) uint8 view of the frame's `self.box` holding
        the portrait's pixels there (row-contiguous: a slice of a C-order frame)."""
        height, width = box.shape[:2]
        side = (self.crop_size, self.crop_size)
        big = crop if crop.shape[:2] == side else cv2.resize(crop, side, interpolation=cv2.INTER_CUBIC)
        if self.window is not None:  # a whole-pixel shift: the warp would copy these pixels exactly
            row, col = self.window
            source = big[row : row + height, col : col + width]
        else:
            source = self._placed
            cv2.warpAffine(big, self.warp, (width, height), dst=source, flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)  # fmt: skip
        written = cv2.blendLinear(source, self.base, self.alpha, self.rest, dst=box)
        if written is not box:  # OpenCV allocated instead (it never has for this uint8 view)
            box[...] = written


def _integer_window(warp: np.ndarray, crop_size: int, box: tuple[int, int]) -> tuple[int, int] | None:
    """(row, col) of the crop's pixel that lands on the box's top-left corner when `warp` (crop -> box, 2x3)
    is a whole-pixel shift whose (height, width) `box` lies inside the crop; None otherwise. Then the warp is
    a copy of crop[row : row + height, col : col + width] (bilinear weights 1 and 0 at integer positions),
    which the blend reads in place: the crop of `native_crop` at scale 1 always is such a shift, and skipping
    the warp saves ~2.8 CPU-ms per frame at 1024² (docs/BENCHMARKS.md)."""
    shift = np.rint(warp[:, 2])
    if not (np.array_equal(warp[:, :2], np.eye(2)) and np.array_equal(warp[:, 2], shift)):
        return None
    col, row = -int(shift[0]), -int(shift[1])
    height, width = box
    if row < 0 or col < 0 or row + height > crop_size or col + width > crop_size:
        return None
    return row, col


def paste_back(portrait: Portrait, crops: np.ndarray, feather: float) -> np.ndarray:
    """(T, S, S, 3) rendered crops blended into the portrait frame through the crop transform: (T, H, W, 3)."""
    return Paster(portrait, feather)(crops)
