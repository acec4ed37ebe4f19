"""Public-domain portraits that ship inside installed packages, with their provenance.

A registry of named loaders: params choose a portrait by name. Every loader returns the full image;
`prepare_portrait` crops a square head-and-shoulders view around the face MediaPipe finds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

import cv2
import numpy as np

# MediaPipe FaceMesh landmark indices used to place the animation (canonical 468/478 topology).
UPPER_INNER_LIP = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LOWER_INNER_LIP = (308, 324, 318, 402, 317, 14, 87, 178, 88, 95, 78)
MOUTH_CORNERS = (61, 291)
CHIN, FOREHEAD = 152, 10
EYES = ((33, 133, 159, 145), (362, 263, 386, 374))  # (corner, corner, upper lid, lower lid)


class NoFaceError(RuntimeError):
    """MediaPipe found no face (or more than one) where exactly one is required."""


@dataclass(frozen=True)
class PortraitAsset:
    package: str  # distribution that ships the file; its version goes into provenance
    asset: str  # how to get it, e.g. "skimage.data.astronaut()"
    licence: str
    description: str
    load: Callable[[], np.ndarray]  # -> (H, W, 3) uint8 RGB
    # FaceMesh landmarks (index -> (x, y) pixels in the loaded image) that place the animation.
    # Measured once with `detect_landmarks` and stored with the asset, so generation needs no face
    # detector and its bytes cannot depend on a CPU's XNNPACK kernels; a test re-measures them.
    keypoints: dict[int, tuple[float, float]]


def _astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


def _grace_hopper() -> np.ndarray:
    import matplotlib.cbook
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        return np.asarray(Image.open(handle).convert("RGB"))


PORTRAITS: dict[str, PortraitAsset] = {
    "skimage_astronaut": PortraitAsset(
        package="scikit-image",
        asset="skimage.data.astronaut()",
        licence="public-domain",
        description="Eileen Collins, NASA portrait (public domain, via scikit-image sample data)",
        load=_astronaut,
        keypoints={
            10: (226.3, 71.7),
            13: (223.5, 143.2),
            14: (223.0, 150.1),
            33: (195.2, 100.9),
            61: (201.8, 139.2),
            78: (203.3, 139.9),
            80: (209.1, 140.7),
            81: (212.9, 141.5),
            82: (217.6, 142.4),
            87: (217.3, 149.3),
            88: (209.0, 145.5),
            95: (206.4, 143.2),
            133: (213.3, 103.7),
            145: (203.4, 104.3),
            152: (221.3, 177.4),
            159: (202.8, 97.6),
            178: (212.6, 147.7),
            191: (205.9, 140.1),
            263: (255.8, 104.3),
            291: (245.0, 141.0),
            308: (243.4, 141.5),
            310: (237.8, 141.8),
            311: (234.1, 142.3),
            312: (229.4, 142.9),
            317: (228.6, 149.7),
            318: (237.1, 146.6),
            324: (239.9, 144.6),
            362: (237.0, 104.9),
            374: (246.6, 106.7),
            386: (248.3, 99.7),
            402: (233.3, 148.5),
            415: (240.9, 141.6),
        },
    ),
    "matplotlib_grace_hopper": PortraitAsset(
        package="matplotlib",
        asset="matplotlib mpl-data/sample_data/grace_hopper.jpg",
        licence="public-domain",
        description="Grace Hopper, U.S. Navy portrait (public domain, via matplotlib sample data)",
        load=_grace_hopper,
        keypoints={
            10: (264.3, 132.8),
            13: (267.7, 279.1),
            14: (267.7, 279.1),
            33: (205.0, 193.4),
            61: (232.4, 280.6),
            78: (235.6, 280.3),
            80: (245.4, 279.0),
            81: (251.7, 278.8),
            82: (259.3, 278.9),
            87: (259.4, 279.0),
            88: (245.6, 279.3),
            95: (240.8, 279.7),
            133: (243.6, 193.1),
            145: (224.7, 197.3),
            152: (270.3, 333.6),
            159: (219.6, 185.8),
            178: (251.9, 278.9),
            191: (240.7, 279.6),
            263: (323.6, 188.1),
            291: (302.5, 277.1),
            308: (299.3, 277.1),
            310: (290.0, 277.0),
            311: (283.8, 277.4),
            312: (276.4, 278.2),
            317: (276.1, 278.2),
            318: (289.6, 277.1),
            324: (294.3, 277.1),
            362: (288.1, 192.1),
            374: (306.7, 192.4),
            386: (309.0, 182.4),
            402: (283.5, 277.4),
            415: (294.4, 277.0),
        },
    ),
}


@dataclass(frozen=True)
class Portrait:
    """A square portrait crop with the keypoints that drive its animation."""

    image: np.ndarray  # (S, S, 3) uint8 RGB
    keypoints: dict[int, np.ndarray]  # FaceMesh index -> (2,) pixels in `image`
    provenance: dict

    def point(self, index: int) -> np.ndarray:
        return self.keypoints[index]

    def points(self, indices: tuple[int, ...]) -> np.ndarray:
        return np.stack([self.keypoints[i] for i in indices])


def asset_provenance(name: str) -> dict:
    """Where a named portrait comes from: package, version, asset, licence."""
    return {
        "portrait": name,
        "package": _asset(name).package,
        "package_version": metadata.version(_asset(name).package),
        "asset": _asset(name).asset,
        "licence": _asset(name).licence,
        "description": _asset(name).description,
    }


def _asset(name: str) -> PortraitAsset:
    try:
        return PORTRAITS[name]
    except KeyError:
        raise KeyError(f"unknown portrait {name!r}; choose one of {sorted(PORTRAITS)}") from None


def detect_landmarks(image: np.ndarray) -> np.ndarray:
    """FaceMesh (static, refined) on one RGB image -> (478, 2) pixel coordinates of its one face."""
    import mediapipe as mp

    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True, max_num_faces=2) as mesh:
        result = mesh.process(image)
    faces = result.multi_face_landmarks or []
    if len(faces) != 1:
        raise NoFaceError(f"expected exactly one face, found {len(faces)}")
    height, width = image.shape[:2]
    return np.array([(p.x * width, p.y * height) for p in faces[0].landmark], dtype=np.float64)


def prepare_portrait(name: str, size: int) -> Portrait:
    """Load portrait `name`, crop a square of 2.4 face heights around the face, resize to `size`."""
    asset = _asset(name)
    full = asset.load()
    points = {i: np.array(xy, dtype=np.float64) for i, xy in asset.keypoints.items()}
    face_height = float(np.linalg.norm(points[CHIN] - points[FOREHEAD]))
    # Centre a little below the face centre so the chin and neck are in view.
    centre = (points[CHIN] + points[FOREHEAD]) / 2 + np.array([0.0, 0.1 * face_height])
    side = 2.4 * face_height
    x0, y0 = centre - side / 2
    scale = size / side
    crop = np.array([[scale, 0, -x0 * scale], [0, scale, -y0 * scale]])
    # Reflect at the image border: the astronaut's face sits near the top of her photo.
    image = cv2.warpAffine(full, crop, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)
    provenance = asset_provenance(name) | {
        "source_sha256": hashlib.sha256(np.ascontiguousarray(full).tobytes()).hexdigest(),
        "crop_xywh": [round(float(v), 2) for v in (x0, y0, side, side)],
    }
    keypoints = {i: (p - (x0, y0)) * scale for i, p in points.items()}
    return Portrait(image=image, keypoints=keypoints, provenance=provenance)
