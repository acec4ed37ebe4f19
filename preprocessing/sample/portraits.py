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
N_LANDMARKS = 478  # 468 mesh points + 10 refined iris points


class NoFaceError(RuntimeError):
    """MediaPipe found no face (or more than one) where exactly one is required."""


@dataclass(frozen=True)
class PortraitAsset:
    package: str  # distribution that ships the file; its version goes into provenance
    asset: str  # how to get it, e.g. "skimage.data.astronaut()"
    licence: str
    description: str
    load: Callable[[], np.ndarray]  # -> (H, W, 3) uint8 RGB


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
    ),
    "matplotlib_grace_hopper": PortraitAsset(
        package="matplotlib",
        asset="matplotlib mpl-data/sample_data/grace_hopper.jpg",
        licence="public-domain",
        description="Grace Hopper, U.S. Navy portrait (public domain, via matplotlib sample data)",
        load=_grace_hopper,
    ),
}


@dataclass(frozen=True)
class Portrait:
    """A square portrait crop with the FaceMesh landmarks that drive its animation."""

    image: np.ndarray  # (S, S, 3) uint8 RGB
    mesh: np.ndarray  # (478, 3) float64 landmarks in `image` pixels (z scaled like x, away from camera)
    provenance: dict

    def point(self, index: int) -> np.ndarray:
        """(2,) pixels of landmark `index`."""
        return self.mesh[index, :2]

    def points(self, indices: tuple[int, ...]) -> np.ndarray:
        """(len(indices), 2) pixels of the landmarks `indices`."""
        return self.mesh[list(indices), :2]


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


def measure_mesh(image: np.ndarray) -> np.ndarray:
    """FaceMesh (static, refined) on one RGB image -> (478, 3) landmarks of its one face.

    x, y in pixels; z = MediaPipe z * image width, positive away from the camera (as preprocessing.face).
    """
    import mediapipe as mp

    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True, max_num_faces=2) as mesh:
        result = mesh.process(image)
    faces = result.multi_face_landmarks or []
    if len(faces) != 1:
        raise NoFaceError(f"expected exactly one face, found {len(faces)}")
    height, width = image.shape[:2]
    return np.array([(p.x * width, p.y * height, p.z * width) for p in faces[0].landmark], dtype=np.float64)


def mesh_module_text(meshes: dict[str, np.ndarray]) -> str:
    """Source of `meshes.py` for {portrait name: (478, 3) mesh}: one "x y z" row per landmark, 0.01 px."""
    blocks = []
    for name, mesh in sorted(meshes.items()):
        rows = "\n".join(" ".join(f"{v:.2f}" for v in point) for point in mesh)
        blocks.append(f'    "{name}": """\n{rows}\n""",\n')
    return MESH_MODULE_HEADER + "MESHES = {\n" + "".join(blocks) + "}\n"


MESH_MODULE_HEADER = '''"""FaceMesh landmarks of the bundled portraits (made by portraits.mesh_module_text).

One block per portrait: 478 rows "x y z" in landmark order (468 mesh points, then the 10 refined
iris points), in pixels of the full loaded image: x right, y down, z = MediaPipe z * image width,
positive away from the camera. Regenerate with
    from preprocessing.sample.portraits import PORTRAITS, measure_mesh, mesh_module_text
    text = mesh_module_text({name: measure_mesh(a.load()) for name, a in PORTRAITS.items()})
and check that tests/test_sample_corpus.py::test_portrait_meshes_match_facemesh still passes.
"""

'''


def stored_mesh(name: str) -> np.ndarray:
    """(478, 3) float64 FaceMesh landmarks of portrait `name` in the full loaded image, as stored.

    Pixels: x right, y down, z = MediaPipe z * width, positive away from the camera. Measured once
    with `measure_mesh` and stored in `meshes.py`, so generation needs no face detector and its
    bytes cannot depend on a CPU's XNNPACK kernels; a test re-measures them.
    """
    from preprocessing.sample.meshes import MESHES

    mesh = np.array(MESHES[name].split(), dtype=np.float64).reshape(-1, 3)
    if mesh.shape != (N_LANDMARKS, 3):
        raise ValueError(f"stored mesh of {name!r} has shape {mesh.shape}, expected ({N_LANDMARKS}, 3)")
    return mesh


def prepare_portrait(name: str, size: int) -> Portrait:
    """Load portrait `name`, crop a square of 2.4 face heights around the face, resize to `size`."""
    asset = _asset(name)
    full = asset.load()
    mesh = stored_mesh(name)
    face_height = float(np.linalg.norm(mesh[CHIN, :2] - mesh[FOREHEAD, :2]))
    # Centred on the face. Measured: centring 0.1 face heights lower brings in more of the astronaut's
    # helmet ring, which FaceMesh's detector then scores up to 0.59 as a second face on some frames
    # (detection threshold 0.5); centred, that score stays below 0.05 on every frame.
    centre = (mesh[CHIN, :2] + mesh[FOREHEAD, :2]) / 2
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
    # x, y shift and scale with the crop; z is scaled like x (it is "at the scale of x").
    cropped = np.column_stack([(mesh[:, :2] - (x0, y0)) * scale, mesh[:, 2] * scale])
    return Portrait(image=image, mesh=cropped, provenance=provenance)
