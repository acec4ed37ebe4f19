"""`vasa plan`: what a params file will cost on N GPUs, before any GPU is rented.

    params (+ overlays) -> per-sample cost of every trained network, counted on the meta device
    (vasa/training/cost.py: FLOPs, fp32 activations saved for backward, parameter counts)
    -> with the corpus size, the GPU's peak and an assumed MFU: global batch, samples, GPU-hours and wall
    hours per stage, memory per GPU, loader cores and RAM per GPU, storage for shards and checkpoints
    -> refusals: settings that cannot fit (memory, host RAM, loader cores, a global batch N GPUs cannot split).

Per stage, as the stages run: train_latent, train_motion and the judges train through the engine on N
processes (`accelerate launch`, cluster/); the judges hold every train clip in memory in each process, so they
are budgeted as one process, as is extract_motion (one device, frames decoded in the same process).

Time: items x FLOP per item / (GPUs x peak x MFU), unless the CPU side is slower: stage 1's loader workers
(decode + tensor conversion per sample), extract_motion's and the judges' decode (one process). Memory per GPU:
fp32 weights, gradients and AdamW moments (16 bytes per trained parameter, sharded by ZeRO stage: 1 the
moments, 2 also the gradients, 3 also the weights), the fp32 EMA shadow, frozen weights, activations (counted
fp32: an upper bound under bf16 autocast) x micro-batch, plus CUDA_RESERVED_GIB and ALLOCATOR_SLACK.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from vasa.core.config import Params, TrainConfig
from vasa.loaders.judge_clips import MOUTH_H, MOUTH_W
from vasa.loaders.pairs import worker_frames
from vasa.models.presets import get_preset
from vasa.plan.costs import (
    ALLOCATOR_SLACK,
    CONVERT_CPU_S_512,
    CUDA_RESERVED_GIB,
    DECODE_CPU_S_512,
    GIB,
    GPUS,
    MOTION_WINDOW_CPU_S,
    NODE_GPUS,
    TO_TENSOR_CPU_S_512,
    VOXCELEB2,
    WORKER_BASE_GIB,
    Corpus,
    Costs,
    Gpu,
    audio_dim,
    motion_frame_bytes,
    shard_frame_bytes,
)
from vasa.training.cost import StepCost


@dataclass(frozen=True)
class Loader:
    """A training stage's DataLoader workers against the rate its GPU could take."""

    stage: str
    gpu_rate: float  # items/s one GPU takes at the assumed MFU
    cpu_s: float  # CPU seconds per item in a worker
    workers: int  # per GPU (params data.workers); 0 = the trainer process loads between steps
    worker_gib: float  # RSS per worker

    @property
    def rate(self) -> float:
        """Items/s per GPU: the GPU's rate or the workers', whichever is lower."""
        if self.cpu_s == 0:
            return self.gpu_rate
        cpu_rate = self.workers / self.cpu_s if self.workers else 1 / (1 / self.gpu_rate + self.cpu_s)
        return min(self.gpu_rate, cpu_rate)

    @property
    def cores_needed(self) -> float:
        return self.gpu_rate * self.cpu_s


@dataclass(frozen=True)
class StageBudget:
    """One stage's figures (one row of the printed table)."""

    stage: str
    gpus: int
    global_batch: int | None  # None: not a training stage
    steps: int | None
    items: float  # samples, frames or windows processed
    item: str
    tflop_per_item: float
    bound: str  # what limits the rate: "GPU", "loader", "decode"
    wall_hours: float
    gpu_hours: float
    memory_gib: dict[str, float]  # per GPU, by part
    checkpoint_minutes: float | None = None
    passes: float | None = None  # passes over the train data: reads of each clip (stage 1), W-frame windows (2)

    @property
    def memory_total_gib(self) -> float:
        return sum(self.memory_gib.values())


@dataclass(frozen=True)
class Budget:
    """Everything `vasa plan` prints; `refusals` non-empty = the settings cannot run as given."""

    gpu: Gpu
    gpus: int
    zero: int
    mfu: float
    corpus: Corpus
    frames: float
    train_clips: float
    stages: tuple[StageBudget, ...]
    loaders: tuple[Loader, ...]
    judges_ram_gib: float
    storage_bytes: dict[str, float]
    notes: tuple[str, ...] = ()
    refusals: tuple[str, ...] = ()

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages)

    @property
    def wall_hours(self) -> float:
        return sum(s.wall_hours for s in self.stages)


def budget(
    params: Params,
    costs: Costs,
    gpus: int,
    gpu: str = "h100",
    *,
    zero: int = 0,
    mfu: float = 0.3,
    global_batch: dict[str, int] | None = None,
    corpus: Corpus = VOXCELEB2,
) -> Budget:
    """The budget of `params` on `gpus` GPUs of kind `gpu` (a key of GPUS) at the assumed `mfu`; `global_batch`
    maps a training stage (train_latent, train_motion, sync, capp) to the global batch it must keep."""
    if gpus < 1 or not 0 < mfu <= 1 or zero not in (0, 1, 2, 3):
        raise ValueError(f"need gpus >= 1, 0 < mfu <= 1 and a ZeRO stage 0-3, got {gpus}, {mfu}, {zero}")
    kind = GPUS[gpu]
    fps = params.preprocess.fps
    frames = (corpus.dev_hours + corpus.test_hours) * 3600 * fps
    val = params.ingest.val_fraction
    train_clips, train_frames = corpus.dev_clips * (1 - val), corpus.dev_hours * 3600 * fps * (1 - val)
    clip_frames = corpus.dev_hours * 3600 * fps / corpus.dev_clips
    flop_s = kind.peak_tflops * 1e12 * mfu  # per GPU
    latent, motion, judges = params.train_latent, params.train_motion, params.judges
    resolution, crop = get_preset(latent.model).resolution, params.preprocess.crop_size

    # Training stages: the GPU's rate, unless the loader workers are slower. A stage-1 worker decodes a clip's
    # train frames once (stopping after the last one its samples use) for `pairs_per_clip` samples, converts
    # 3 frames per sample (source, driver, a spare `other`) and makes 3 tensors (vasa/loaders/pairs.py); it
    # holds `worker_frames` decoded frames at most.
    decoded = clip_frames * (1 - latent.data.holdout_fraction)
    cpu_s = (
        decoded * DECODE_CPU_S_512 * (crop / 512) ** 2 / latent.data.pairs_per_clip
        + 3 * CONVERT_CPU_S_512 * (crop / 512) ** 2
        + 3 * TO_TENSOR_CPU_S_512 * (resolution / 512) ** 2
    )
    worker_gib = WORKER_BASE_GIB + worker_frames(latent.data) * resolution**2 * 3 / GIB
    loaders = (
        Loader("train_latent", flop_s / costs.latent.flop, cpu_s, latent.data.workers, worker_gib),
        Loader("train_motion", flop_s / costs.motion.flop, MOTION_WINDOW_CPU_S, motion.data.workers, WORKER_BASE_GIB),
    )
    stage1 = _training("train_latent", latent.train, costs.latent, gpus, zero, loaders[0], "sample",
                       train_clips * latent.data.pairs_per_clip)  # fmt: skip
    stage2 = _training("train_motion", motion.train, costs.motion, gpus, zero, loaders[1], "window",
                       train_frames / motion.window)  # fmt: skip

    # extract_motion: every frame of every split through the motion encoder, decoded in the same process.
    encode_s = frames * costs.encoder.flop / flop_s
    decode_s = frames * (DECODE_CPU_S_512 + CONVERT_CPU_S_512) * (crop / 512) ** 2
    extract = StageBudget(
        "extract_motion",
        1,
        None,
        None,
        frames,
        "frame",
        costs.encoder.flop / 1e12,
        "decode" if decode_s > encode_s else "GPU",
        (encode_s + decode_s) / 3600,
        (encode_s + decode_s) / 3600,
        _memory(costs.encoder, 1, 0, params.extract_motion.batch_size),
    )

    # Judges: one process reads every train clip into memory (mouth crops, log-mel, head angles), then trains.
    judges_gib = train_frames * (MOUTH_H * MOUTH_W + audio_dim(params) * 4 + 3 * 4) / GIB
    load_s = train_frames * (DECODE_CPU_S_512 + CONVERT_CPU_S_512) * (crop / 512) ** 2
    sync, capp = (
        _training(name, cfg.train, cost, 1, zero, Loader(name, flop_s / cost.flop, 0.0, 1, 0.0), "window")
        for name, cfg, cost in (("sync", judges.sync, costs.sync), ("capp", judges.capp, costs.capp))
    )
    judge_hours = load_s / 3600 + sync.wall_hours + capp.wall_hours
    judges_stage = StageBudget(
        "train_judges", 1, None, None, sync.items + capp.items, "window",
        (sync.items * sync.tflop_per_item + capp.items * capp.tflop_per_item) / (sync.items + capp.items),
        "decode" if load_s / 3600 > sync.wall_hours + capp.wall_hours else "GPU", judge_hours, judge_hours,
        max(sync.memory_gib, capp.memory_gib, key=lambda m: sum(m.values())),
    )  # fmt: skip

    refusals: list[str] = []
    for name, train, processes in (("train_latent", latent.train, gpus), ("train_motion", motion.train, gpus),
                                   ("sync", judges.sync.train, 1), ("capp", judges.capp.train, 1)):  # fmt: skip
        refusals += _batch_refusals(name, train.batch_size, train.grad_accum, processes, (global_batch or {}).get(name))
    for stage in (stage1, extract, stage2, sync, capp):
        refusals += _memory_refusals(stage, kind, params)
    refusals += _host_refusals(loaders, judges_gib, min(gpus, NODE_GPUS), kind)
    stages = (stage1, extract, stage2, judges_stage)
    notes = _notes(params, loaders, extract, judges_stage, load_s)
    storage = _storage(params, costs, frames, train_frames)
    return Budget(kind, gpus, zero, mfu, corpus, frames, train_clips, stages, loaders, judges_gib, storage, notes,
                  tuple(refusals))  # fmt: skip


def _training(stage: str, train: TrainConfig, cost: StepCost, gpus: int, zero: int, loader: Loader, item: str,
              items_per_pass: float | None = None) -> StageBudget:  # fmt: skip
    """A stage trained by the engine on `gpus` processes, as fast as its loader and GPU allow."""
    global_batch = train.batch_size * gpus * train.grad_accum
    items = float(train.steps * global_batch)
    wall_s = items / (gpus * loader.rate)
    return StageBudget(
        stage, gpus, global_batch, train.steps, items, item, cost.flop / 1e12,
        "GPU" if loader.rate >= loader.gpu_rate else "loader", wall_s / 3600, wall_s * gpus / 3600,
        _memory(cost, gpus, zero, train.batch_size),
        checkpoint_minutes=wall_s / train.steps * train.checkpoint_every / 60,
        passes=items / items_per_pass if items_per_pass else None,
    )  # fmt: skip


def _memory(cost: StepCost, gpus: int, zero: int, micro_batch: int) -> dict[str, float]:
    """GiB per GPU by part (see the module docstring)."""
    p = cost.parameters
    parts = {
        "weights": 4 * p / (gpus if zero == 3 else 1),
        "gradients": 4 * p / (gpus if zero >= 2 else 1),
        "adam": 8 * p / (gpus if zero >= 1 else 1),
        "ema": 4 * cost.ema,
        "frozen": 4 * cost.frozen,
        "activations": micro_batch * cost.activation_bytes,
    }
    parts = {k: v / GIB for k, v in parts.items()}
    parts["reserved"] = CUDA_RESERVED_GIB + ALLOCATOR_SLACK * sum(parts.values())
    return parts


def _memory_refusals(stage: StageBudget, kind: Gpu, params: Params) -> list[str]:
    total = stage.memory_total_gib
    if total <= kind.memory_gib:
        return []
    activation = stage.memory_gib["activations"]
    micro = {"train_latent": params.train_latent.train.batch_size, "train_motion": params.train_motion.train.batch_size,
             "sync": params.judges.sync.train.batch_size, "capp": params.judges.capp.train.batch_size,
             "extract_motion": params.extract_motion.batch_size}[stage.stage]  # fmt: skip
    per_item = activation / micro * (1 + ALLOCATOR_SLACK)
    fits = max(0, math.floor((kind.memory_gib - (total - activation * (1 + ALLOCATOR_SLACK))) / per_item))
    key = (
        "extract_motion.batch_size" if stage.stage == "extract_motion" else f"{_section(stage.stage)}.train.batch_size"
    )
    return [f"{stage.stage}: {total:.1f} GiB per GPU (activations {activation:.1f} GiB at batch {micro}) exceed the "
            f"{kind.memory_gib:.1f} GiB of an {kind.name}: {key} <= {fits} fits"
            + (" (raise grad_accum to keep the global batch)" if fits else "")]  # fmt: skip


def _section(stage: str) -> str:
    return {"sync": "judges.sync", "capp": "judges.capp"}.get(stage, stage)


def _batch_refusals(stage: str, batch: int, accum: int, processes: int, wanted: int | None) -> list[str]:
    if wanted is None or batch * processes * accum == wanted:
        return []
    if wanted % (processes * accum):
        return [f"{stage}: a global batch of {wanted} is no whole batch per GPU on {processes} GPU(s) x grad_accum "
                f"{accum}"]  # fmt: skip
    return [
        f"{stage}: global batch {batch * processes * accum} (batch_size {batch} x {processes} x grad_accum "
        f"{accum}), not {wanted}: set {_section(stage)}.train.batch_size: {wanted // (processes * accum)}"
    ]


def _host_refusals(loaders: tuple[Loader, ...], judges_gib: float, node_gpus: int, kind: Gpu) -> list[str]:
    """Loader workers (+ one core per trainer) and their RAM per node; the judges' one process."""
    out = []
    for lo in loaders:
        cores = (lo.workers + 1) * node_gpus
        if cores > kind.node_cores:
            out.append(f"{lo.stage}.data.workers: ({lo.workers} loader workers + 1 trainer) x {node_gpus} GPUs need "
                       f"{cores} cores; the node has {kind.node_cores}")  # fmt: skip
        if lo.workers * lo.worker_gib * node_gpus > kind.node_ram_gib:
            out.append(f"{lo.stage}.data: loader workers need {lo.workers * lo.worker_gib * node_gpus:.0f} GiB of RAM "
                       f"per node ({lo.worker_gib:.1f} GiB each); the node has {kind.node_ram_gib:.0f}: lower "
                       "the shuffle buffer or workers")  # fmt: skip
    if judges_gib > kind.node_ram_gib:
        out.append(f"train_judges: the train split's clips need {judges_gib:.0f} GiB of RAM in one process; the node "
                   f"has {kind.node_ram_gib:.0f}")  # fmt: skip
    return out


def _storage(params: Params, costs: Costs, frames: float, train_frames: float) -> dict[str, float]:
    """Bytes on disk: shards and the preprocess cache (same members per clip), motion shards and the train split
    again as memory-mapped arrays (the same float32 members), checkpoints."""
    shard = frames * sum(shard_frame_bytes(params).values())
    motion = frames * motion_frame_bytes(params)

    def states(cost: StepCost, keep: int) -> float:  # resumable states (weights, moments, EMA) + the EMA model
        return keep * (12 * cost.parameters + 4 * cost.ema) + 4 * cost.ema

    return {
        "shards": shard,
        "preprocess cache": shard,
        "motion shards": motion,
        "motion arrays (train)": train_frames * motion_frame_bytes(params),
        "checkpoints train_latent": states(costs.latent, params.train_latent.train.keep_checkpoints),
        "checkpoints train_motion": states(costs.motion, params.train_motion.train.keep_checkpoints),
        "checkpoints judges": states(costs.sync, params.judges.sync.train.keep_checkpoints)
        + states(costs.capp, params.judges.capp.train.keep_checkpoints),
    }


def _notes(params: Params, loaders: tuple[Loader, ...], extract: StageBudget, judges: StageBudget,
           load_s: float) -> tuple[str, ...]:  # fmt: skip
    notes = []
    weights = params.train_latent.loss.perceptual_weights
    if params.train_latent.loss.perceptual > 0 and weights and not Path(weights).is_file():
        notes.append(f"train_latent.loss.perceptual_weights {weights} is not here: train_latent stops until it is")
    for lo in loaders:
        if lo.rate < lo.gpu_rate:
            notes.append(f"{lo.stage} is loader-bound: {lo.workers} workers per GPU, {lo.cores_needed:.1f} cores "
                         f"would keep up with the GPU ({lo.rate / lo.gpu_rate:.0%} of its rate)")  # fmt: skip
    if extract.bound == "decode":
        notes.append(f"extract_motion decodes every frame in its one process: {extract.wall_hours:.0f} h, "
                     "not the encoder's FLOPs")  # fmt: skip
    if judges.bound == "decode":
        notes.append(f"train_judges reads every train clip in one process first: {load_s / 3600:.0f} h of decoding")
    if params.preprocess.audio.encoder_dir is not None:
        notes.append("audio features from preprocess.audio.encoder_dir are not budgeted (log-mel sizes used)")
    return tuple(notes)


def render(plan: Budget, sources: str = "params") -> str:
    """The budget as the text `vasa plan` prints."""
    g = plan.gpu
    lines = [
        f"vasa plan: {sources} on {plan.gpus} x {g.name} ({g.memory_gib:.1f} GiB, {g.peak_tflops:g} TFLOP/s dense "
        f"bf16), {'DDP' if plan.zero == 0 else f'DeepSpeed ZeRO-{plan.zero}'}, MFU {plan.mfu:.0%} (assumed)",
        f"corpus: {plan.corpus.name}, {plan.corpus.dev_clips + plan.corpus.test_clips:,} clips, "
        f"{plan.frames / 1e6:.1f} M frames; train split {plan.train_clips:,.0f} clips",
        "",
        f"{'stage':15s} {'GPUs':>4s} {'global batch':>12s} {'steps':>9s} {'TFLOP/item':>16s} {'items':>9s} "
        f"{'bound':>7s} {'GPU-h':>8s} {'wall h':>7s} {'GiB/GPU':>8s}",
    ]
    for s in plan.stages:
        batch = f"{s.global_batch:,}" if s.global_batch else "-"
        steps = f"{s.steps:,}" if s.steps else "-"
        lines.append(f"{s.stage:15s} {s.gpus:4d} {batch:>12s} {steps:>9s} {f'{s.tflop_per_item:.4g}/{s.item}':>16s} "
                     f"{s.items / 1e6:>8.1f}M {s.bound:>7s} {s.gpu_hours:8.1f} {s.wall_hours:7.1f} "
                     f"{s.memory_total_gib:8.1f}")  # fmt: skip
    lines.append(f"{'total':15s} {'':4s} {'':>12s} {'':>9s} {'':>16s} {'':>9s} {'':>7s} {plan.gpu_hours:8.1f} "
                 f"{plan.wall_hours:7.1f}")  # fmt: skip
    lines += ["", "memory per GPU (GiB; activations counted fp32, an upper bound under bf16):"]
    for s in plan.stages:
        lines.append(f"  {s.stage:15s} " + ", ".join(f"{k} {v:.2f}" for k, v in s.memory_gib.items())
                     + f" = {s.memory_total_gib:.1f} of {g.memory_gib:.1f}")  # fmt: skip
    lines.append("schedule:")
    for s in plan.stages:
        if s.checkpoint_minutes is not None:
            passes = f", {s.passes:.1f} passes over the train data" if s.passes is not None else ""
            lines.append(f"  {s.stage:15s} a checkpoint every {s.checkpoint_minutes:.1f} min{passes}")
    node = min(plan.gpus, NODE_GPUS)
    for lo in plan.loaders:
        lines.append(
            f"loader ({lo.stage}): the GPU takes {lo.gpu_rate:,.0f} items/s x {lo.cpu_s * 1e3:.2g} CPU-ms per item = "
            f"{lo.cores_needed:.1f} cores per GPU; {lo.workers} workers x {lo.worker_gib:.1f} GiB = "
            f"{lo.workers * lo.worker_gib:.1f} GiB RAM per GPU; per node of {node}: {(lo.workers + 1) * node} cores "
            f"with the trainers, {lo.workers * lo.worker_gib * node:.0f} GiB (node: {g.node_cores} cores, "
            f"{g.node_ram_gib:.0f} GiB)"
        )
    lines += [
        f"judges: {plan.judges_ram_gib:.0f} GiB of RAM in their one process (every train clip's mouths and log-mel)",
        "storage: " + ", ".join(f"{k} {v / 1e12:.3g} TB" if v >= 1e11 else f"{k} {v / 1e9:.3g} GB"
                                for k, v in plan.storage_bytes.items())
        + f"; total {sum(plan.storage_bytes.values()) / 1e12:.2f} TB",
    ]  # fmt: skip
    lines += [f"note: {n}" for n in plan.notes]
    lines += [f"REFUSED: {r}" for r in plan.refusals]
    return "\n".join(lines)
