"""The pinned stack imports together (numpy < 2 for mediapipe constrains everything else)."""

from __future__ import annotations

import importlib
from importlib import metadata

import pytest

MODULES = (
    "torch",
    "mediapipe",
    "decord",
    "av",
    "webdataset",
    "librosa",
    "soxr",
    "pyarrow",
    "pandas",
    "prefect",
    "prefect_dask",
    "dask.distributed",
    "dvc",
    "accelerate",
    "transformers",
    "safetensors",
    "cv2",
    "yt_dlp",
    "imageio_ffmpeg",
    "espeakng_loader",
)


@pytest.mark.parametrize("name", MODULES)
def test_imports(name):
    importlib.import_module(name)


def test_cpu_torch_and_no_cuda_packages():
    import torch

    assert torch.__version__.split("+")[0] == "2.13.0"
    installed = {dist.metadata["Name"].lower() for dist in metadata.distributions()}
    # nvidia-ml-py (NVML bindings that dvclive needs) is pure Python, not a CUDA package.
    assert not {name for name in installed if name.startswith("nvidia-") and name != "nvidia-ml-py"}


def test_mediapipe_has_the_legacy_face_mesh():
    import mediapipe as mp

    assert metadata.version("mediapipe") == "0.10.21"
    assert hasattr(mp.solutions, "face_mesh")
