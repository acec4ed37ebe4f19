"""Pipeline outputs that tests need and a clean clone lacks (no `data/shards`, `data/ingest`, `data/bundle`
there: they are DVC outputs). Built here from nothing but the installed packages, once per test session
(tests/conftest.py holds the session fixtures that call these builders):

    build_sample_shards   a small sample corpus -> the real `ingest` and `preprocess` flows (MediaPipe
                          FaceMesh, a threads runner, a Prefect test server alive only while they run) ->
                          manifest.parquet, shards with index.json, stats and failures.parquet
    write_tiny_bundle     a bundle of freshly initialised, seeded `tiny` networks (as tests/test_generate.py's
                          `bundle_dir`) with the params' audio, crop and motion settings

The corpus is params.yaml's `sample` section made smaller (SMALL_CORPUS): both identities, three clips each
of 3.2 s at 128 px, ~480 frames in all instead of ~1070 at 256 px, which is about 45 s for corpus, Prefect
server, ingest and preprocess together on the shared 2-core machine (the default `sample_corpus` fixture
alone takes ~40 s). Three clips per speaker because the judges and the evaluate stage hold out the last clip
of every speaker; 3.2 s because CAPP's window is 75 frames (3 s).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vasa.core.config import Params

# Changes to params `sample` for the session's corpus (see the module docstring). The length range holds one
# whole number of AAC and video frames: 80 frames (3.2 s).
SMALL_CORPUS = {
    "clips_per_identity": 2,
    "heldout_clips_per_identity": 1,
    "min_seconds": 3.0,
    "max_seconds": 3.3,
    "size": 128,
}


@dataclass(frozen=True)
class SampleShards:
    """What `dvc repro preprocess` leaves in data/: the corpus, the ingest manifest and the shards folder."""

    corpus: Path
    manifest: Path
    shards: Path


def build_sample_shards(params: Params, root: Path, changes: dict | None = None) -> SampleShards:
    """The small sample corpus (params `sample` with SMALL_CORPUS, or with `changes`) through the real ingest and
    preprocess flows, into `root`."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.ingest import MANIFEST_NAME
    from flows.ingest import run as run_ingest
    from flows.preprocess import run as run_preprocess
    from preprocessing.sample.corpus import write_corpus

    corpus = root / "sample"
    write_corpus(params.sample.replace(**(SMALL_CORPUS if changes is None else changes)), corpus)
    pre = params.preprocess
    # Threads (no worker processes to spawn) and no shard pin: params names the checkout's pin file by a path
    # relative to the working directory, and a pin is about that checkout's clips, not these.
    cfg = pre.replace(runner=pre.runner.replace(kind="threads"), shards=pre.shards.replace(pin=None))
    with prefect_test_harness(server_startup_timeout=300):  # 2 busy cores can take minutes to start it
        run_ingest(params.ingest.replace(sources=["sample"]), root / "ingest", sample_dir=corpus)
        run_preprocess(cfg, root / "ingest" / MANIFEST_NAME, root / "shards", root / "preprocess_cache")
    return SampleShards(corpus, root / "ingest" / MANIFEST_NAME, root / "shards")


def write_tiny_bundle(params: Params, folder: Path, n_speakers: int = 2) -> Path:
    """A bundle (vasa.inference.bundle) of untrained tiny networks, seeded: same params, same bytes of weights.
    The DiT's zero-initialised output head is given small weights so that the motion moves."""
    import torch

    from vasa.inference.bundle import bundle_meta, write_bundle
    from vasa.models.face_latent import FaceLatent
    from vasa.models.motion_dit import MotionDiT
    from vasa.models.presets import get_motion_preset, get_preset

    pre, motion = params.preprocess, params.train_motion
    mel_per_frame = pre.sample_rate // pre.audio.hop_length // pre.fps  # 4 at 16 kHz, 10 ms hop, 25 fps
    audio_dim, emotion_dim = mel_per_frame * pre.audio.n_mels, 2
    torch.manual_seed(0)
    face = FaceLatent(get_preset("tiny"), n_speakers=n_speakers)
    motion_dim = 7 + face.preset.dynamics_dim
    task = {
        "preset": get_motion_preset("tiny").describe(),
        "motion_dim": motion_dim, "audio_dim": audio_dim, "emotion_dim": emotion_dim,
        "window": motion.window, "context": motion.context,
        "diffusion": motion.diffusion.model_dump(), "guidance": motion.guidance.model_dump(),
    }  # fmt: skip
    dit = MotionDiT(get_motion_preset("tiny"), motion_dim, audio_dim, emotion_dim, motion.window, motion.context)
    torch.nn.init.normal_(dit.out.weight, std=0.02)
    normalisation = {
        "motion": {"mean": [0.0] * motion_dim, "std": [0.3] * 3 + [0.02] * 4 + [0.5] * (motion_dim - 7)},
        "audio": {"mean": [-8.0] * audio_dim, "std": [3.0] * audio_dim},
    }
    folder.mkdir(parents=True, exist_ok=True)
    meta = bundle_meta(params, face, n_speakers, task, normalisation, {"test": True})
    write_bundle(folder, face, dit, meta)
    return folder
