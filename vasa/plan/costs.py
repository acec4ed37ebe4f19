"""What `vasa plan` budgets with: the GPU kinds, the corpus, the constants measured here, and every network's
per-item cost counted on the meta device with the params' own presets and loss settings (vasa/training/cost.py).
Bytes per frame of the shards follow from preprocessing.schema and the params.
"""

from __future__ import annotations

from dataclasses import dataclass

from vasa.core.config import Params
from vasa.evaluation.capp import CAPP, CAPP_PRESETS, CappTask
from vasa.evaluation.sync import FRAMES, SYNC, SYNC_PRESETS, SyncTask
from vasa.loaders.judge_clips import MOUTH_H, MOUTH_W
from vasa.models.motion_dit import EMOTION_COLUMNS
from vasa.models.motion_encoder import POSE_DIM
from vasa.models.presets import get_motion_preset, get_preset
from vasa.training.cost import COUNT_BATCH, StepCost, count_step, encoder_forward, latent_step, motion_step
from vasa.training.motion_task import MotionTask

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    """One GPU kind and the 8-GPU node it usually comes in (DGX-class)."""

    name: str
    memory_gib: float  # usable, as torch.cuda reports total_memory
    peak_tflops: float  # dense bf16, NVIDIA data sheets (benchmarks/gpu_check.py PEAK_TFLOPS)
    node_cores: int  # CPU cores of its 8-GPU node
    node_ram_gib: float


NODE_GPUS = 8
GPUS = {
    "h100": Gpu("NVIDIA H100 SXM 80 GB", 79.2, 989.0, node_cores=112, node_ram_gib=2048.0),  # DGX H100
    "h200": Gpu("NVIDIA H200 SXM 141 GB", 139.8, 989.0, node_cores=112, node_ram_gib=2048.0),  # DGX H200
    "a100": Gpu("NVIDIA A100 SXM 80 GB", 79.2, 312.0, node_cores=128, node_ram_gib=1024.0),  # DGX A100
}


@dataclass(frozen=True)
class Corpus:
    """Clip and hour counts of a corpus; frames follow from params preprocess.fps."""

    name: str
    dev_clips: int  # the part train and val speakers come from
    dev_hours: float
    test_clips: int  # held-out speakers
    test_hours: float
    dev_speakers: int


# VoxCeleb2 as distributed (docs: /work/shared/REFERENCE.md §3; Chung et al. 2018).
VOXCELEB2 = Corpus("VoxCeleb2", dev_clips=1_092_009, dev_hours=2360.0, test_clips=36_237, test_hours=80.0,
                   dev_speakers=5994)  # fmt: skip

# Measured here, 2-core shared VM, CPU seconds (docs/BENCHMARKS.md "`vasa plan`: the cost model").
# PyAV decode of a 512² H.264 crop (superfast, crf 18) per frame, SLICE threads, and the RGB conversion + area
# resize that the stage-1 loader pays only for the frames a sample uses (benchmarks/loader_throughput.py on the
# fixtures' 512² shards, 2026-12-07; 2.9 ms for both in the 2026-11-22 measurement under heavier load)
DECODE_CPU_S_512 = 1.13e-3
CONVERT_CPU_S_512 = 0.55e-3
TO_TENSOR_CPU_S_512 = 1.1e-3  # one 512² uint8 frame -> float tensor in [-1, 1] (vasa.models.images.to_tensor)
WORKER_BASE_GIB = 0.27  # RSS of a loader worker's imports (torch, PyAV, OpenCV, numpy)
# One W=100/K=25 window of `base` motion (263 + 320 dims) gathered from the memory-mapped train arrays, batch 32
# (benchmarks/loader_throughput.py --stage2-only, 2026-12-07; the shard reader before it: 0.55e-3)
MOTION_WINDOW_CPU_S = 0.083e-3
CROP_VIDEO_BYTES_512 = 7.7e3  # per frame, superfast crf 18 (docs/BENCHMARKS.md "Crops at 512²", 4 fixtures)
# Assumed until benchmarks/gpu_check.py has run on a GPU.
CUDA_RESERVED_GIB = 2.0  # CUDA context, cuDNN/cuBLAS workspaces
ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation over the counted bytes
LANDMARK_BYTES = 478 * 3 * 2  # preprocessing.schema: landmarks.npy (T, 478, 3) float16


@dataclass(frozen=True)
class Costs:
    """Per-item cost of each network a params file trains or runs (slow to count: ~30 s for `base`)."""

    latent: StepCost  # per training sample (source/driver/other triple)
    encoder: StepCost  # per frame, forward only (extract_motion)
    motion: StepCost  # per window of W + K frames
    sync: StepCost  # per window of FRAMES mouth crops + 1 + negatives audio windows
    capp: StepCost  # per pose/audio window


def audio_dim(params: Params) -> int:
    """Log-mel values per video frame: mel frames per video frame x n_mels (4 x 80 at the defaults)."""
    pre = params.preprocess
    return pre.sample_rate // pre.audio.hop_length // pre.fps * pre.audio.n_mels


def measure(params: Params, corpus: Corpus = VOXCELEB2) -> Costs:
    """Count every network's per-item cost on the meta device with the params' presets and loss settings."""
    latent, motion, judges = params.train_latent, params.train_motion, params.judges
    preset = get_preset(latent.model)
    speakers = round(corpus.dev_speakers * (1 - params.ingest.val_fraction))  # the CosFace head's classes
    task = MotionTask(
        get_motion_preset(motion.model), motion_dim=POSE_DIM + preset.dynamics_dim, audio_dim=audio_dim(params),
        emotion_dim=len(EMOTION_COLUMNS), window=motion.window, context=motion.context, diffusion=motion.diffusion,
        guidance=motion.guidance, loss=motion.loss,
    )  # fmt: skip
    return Costs(
        latent=latent_step(latent.loss, preset, speakers),
        encoder=encoder_forward(preset),
        motion=motion_step(task),
        sync=_judge_step(
            SYNC,
            SyncTask(SYNC_PRESETS[judges.sync.model], *_mel(params), judges.sync.negatives, judges.sync.temperature),
            params,
        ),  # fmt: skip
        capp=_judge_step(
            CAPP, CappTask(CAPP_PRESETS[judges.capp.model], judges.capp.window, audio_dim(params)), params
        ),  # fmt: skip
    )


def _mel(params: Params) -> tuple[int, int]:
    pre = params.preprocess
    return pre.sample_rate // pre.audio.hop_length // pre.fps, pre.audio.n_mels


def _judge_step(name: str, task: SyncTask | CappTask, params: Params) -> StepCost:
    import torch

    k, n_mels = _mel(params)
    with torch.device("meta"):
        models = task.build()
        if name == SYNC:
            candidates = 1 + params.judges.sync.negatives
            batch = {"mouths": torch.empty(COUNT_BATCH, FRAMES, MOUTH_H, MOUTH_W),
                     "audio": torch.empty(COUNT_BATCH, candidates, FRAMES * k, n_mels)}  # fmt: skip
        else:
            window = params.judges.capp.window
            batch = {"pose": torch.empty(COUNT_BATCH, window, 3), "audio": torch.empty(COUNT_BATCH, window, k * n_mels)}
        return count_step(models, [name], lambda n, s: task.loss(n, models, batch, s)[0], COUNT_BATCH, [name])


def shard_frame_bytes(params: Params) -> dict[str, float]:
    """Bytes per frame of a preprocess shard sample, by kind: the crop video (measured at 512², scaled by area),
    the per-frame arrays (preprocessing.schema: pose, crop transform, landmarks, gaze, expression, log-mel) and
    the 16-bit mono wav; tar headers (~5 KB per clip) are left out."""
    pre = params.preprocess
    k, n_mels = _mel(params)
    return {
        "video": CROP_VIDEO_BYTES_512 * (pre.crop_size / 512) ** 2,
        "arrays": 7 * 4 + 6 * 4 + LANDMARK_BYTES + 2 * 4 + 6 * 4 + k * n_mels * 4,
        "wav": pre.sample_rate / pre.fps * 2,
    }


def motion_frame_bytes(params: Params) -> float:
    """Bytes per frame of a motion shard (vasa/loaders/motion.py): motion, audio, gaze, distance, emotion (fp32)."""
    motion_dim = POSE_DIM + get_preset(params.train_latent.model).dynamics_dim
    return 4 * (motion_dim + audio_dim(params) + 2 + 1 + len(EMOTION_COLUMNS))
