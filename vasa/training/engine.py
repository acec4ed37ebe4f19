"""The training loop shared by every network of the project (stage 1, stage 2, evaluation networks).

A stage supplies a `TrainTask` (its networks and losses) and a batch source; Accelerate owns devices
and processes (one CPU, one GPU, N GPUs, many nodes: one code path), DeepSpeed ZeRO-2/3 comes in
through a JSON config from cluster/deepspeed/, plain DDP otherwise (vasa/training/placement.py). Each
named module gets its own AdamW, stepped in `update_order()` (generator, then discriminator); while one
module is updated the others are frozen (requires_grad off), so no gradient leaks between them. The loop
adds gradient accumulation, clipping, bf16/fp16 autocast on GPU (fp32 on CPU), EMA, warm-up + cosine
LR, checkpoints every N steps with `--resume`, DVCLive metrics, PNG grids and a progress bar; optionally
activation checkpointing and torch.compile (vasa/training/steps.py).

Partitioning: under ZeRO-3 every rank holds a shard of each parameter, so whatever reads the weights
whole (EMA, the NaN check, digests, the final weights) gathers them on every rank, and image grids are
drawn on every rank (the forward's gathers are collective); only the main process writes. No host sync
per step: loss terms stay on the device and are read back every `log_every` steps and at each state.

Faults: a resumable state records its files' digests; `--resume` starts from the newest intact one
(warning about each newer state it passes over), and no weights holding NaN or infinity are saved,
resumed into or published (CheckpointError naming the tensor). A full or failing disk while a state
or the model is written raises StorageError ("no space left on device while writing <path>"), and
what was being written is removed.

Determinism: parameters are initialised under `seed` (identical on every rank), then each rank is
seeded `seed * world_size + rank` (DiT's convention). Batches come from `batches(epoch)` where one
data epoch is `checkpoint_every` steps, so a run resumed from a checkpoint sees exactly the batches
an uninterrupted run sees: on CPU the weights at step n are bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from vasa.core.config import TrainConfig
from vasa.core.errors import CheckpointError, InputError, StorageError
from vasa.core.weights import non_finite, storage_errors
from vasa.training import checkpoint
from vasa.training.ema import EMA
from vasa.training.placement import loss_autocast, make_accelerator
from vasa.training.schedule import lr_factor
from vasa.training.steps import Batch, LossLog, frozen, speed_and_memory, to_device, whole, zero3_gather
from vasa.training.tracking import Monitor

log = logging.getLogger(__name__)

BatchSource = Callable[[int, int, int], Iterable[Batch]]  # (epoch, rank, world_size) -> batches


@runtime_checkable
class TrainTask(Protocol):
    """What a stage gives the engine: its networks, their losses and what to log.

    Optional extras, looked up with getattr: `lr_scale(name) -> float` (per-module LR multiplier,
    default 1), `reconstruct(models, batch) -> Tensor (B, 3, S, S) in [-1, 1]` (the driver frame
    rendered from the source's appearance with the driver's motion: used for held-out PSNR) and
    `checkpoint_activations(models)` (params `train.activation_checkpointing`: which blocks recompute).
    """

    def build(self) -> dict[str, nn.Module]: ...

    def update_order(self) -> list[str]: ...

    def ema_modules(self) -> list[str]: ...

    def loss(
        self, name: str, models: dict[str, nn.Module], batch: Batch, scratch: dict
    ) -> tuple[Tensor, dict[str, float | Tensor]]: ...

    def images(self, models: dict[str, nn.Module], batch: Batch) -> np.ndarray: ...

    def describe(self) -> dict: ...


@dataclass(frozen=True)
class RunLayout:
    """Folders of one training run under its output folder."""

    root: Path

    @property
    def states(self) -> Path:  # resumable states (Accelerate + EMA + engine.json + manifest.json)
        return self.root / "checkpoints"

    @property
    def model(self) -> Path:  # the stage's output: EMA weights (safetensors) + model.json
        return self.root / "model"

    @property
    def live(self) -> Path:  # DVCLive: metrics.json, plots/metrics/*.tsv
        return self.root / "live"

    @property
    def images(self) -> Path:  # PNG grids
        return self.root / "images"


@dataclass
class TrainResult:
    step: int
    rank: int
    last_terms: dict[str, float]
    loss_curve: list[dict[str, float]]  # this rank's loss terms at every step of this session
    evaluation: dict[str, float]
    parameter_digests: dict[str, str]  # sha256 of this rank's live parameters, per module
    layout: RunLayout


def _names(tensors: list[str]) -> str:
    """The first few tensor names of a list, for a one-line message."""
    more = f" and {len(tensors) - 3} more" if len(tensors) > 3 else ""
    return ", ".join(tensors[:3]) + more


class _Run:
    """State of one training run; `train()` below is the recipe that drives it."""

    def __init__(self, task: TrainTask, cfg: TrainConfig, layout: RunLayout, deepspeed: dict | None):
        self.task, self.cfg, self.layout = task, cfg, layout
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        modules = task.build()
        speed_and_memory(task, modules, cfg.activation_checkpointing, cfg.compile)
        self.order = list(task.update_order())
        if sorted(self.order) != sorted(modules):
            raise ValueError(f"update_order {self.order} must name each built module once: {sorted(modules)}")
        self.accelerator = make_accelerator(cfg, self.order, deepspeed)
        self.deepspeed = deepspeed is not None
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.base_lr: dict[str, float] = {}
        for name in self.order:
            scale = getattr(task, "lr_scale", lambda _name: 1.0)(name)
            self.base_lr[name] = cfg.lr * scale
            optimizer = torch.optim.AdamW(
                modules[name].parameters(), lr=self.base_lr[name], betas=cfg.betas, weight_decay=cfg.weight_decay
            )
            if self.deepspeed:
                self.accelerator.state.select_deepspeed_plugin(name)
            self.models[name], self.optimizers[name] = self.accelerator.prepare(modules[name], optimizer)
        self.plain = {name: self.accelerator.unwrap_model(model) for name, model in self.models.items()}
        # ZeRO-3 partitions the parameters: whatever reads them whole (EMA, the NaN check, digests, the final
        # weights) gathers them first, on every rank. The EMA shadow itself is a whole fp32 copy on each rank.
        zero3 = self.deepspeed and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        self.gather = zero3_gather if zero3 else None
        self.ema = {name: EMA(self.plain[name], cfg.ema_decay, self.gather) for name in task.ema_modules()}
        from accelerate.utils import gather_object

        self.losses = LossLog(self.accelerator.device, gather_object)
        self.step = 0

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def engine_info(self) -> dict:
        return {
            "step": self.step,
            "world_size": self.world,
            "task": self.task.describe(),
            "train": self.cfg.model_dump(mode="json"),
            "deepspeed": self.deepspeed,
        }

    def non_finite_weights(self) -> list[str]:
        """Model and EMA tensors holding NaN or infinity (`generator.0.weight`, `EMA generator.0.weight`).
        Every process gets an answer at once (a non-empty list if any process found one), so that all of
        them stop together rather than some waiting for the others at the next barrier."""
        found = {f"EMA {name}": non_finite({f"EMA {name}": ema.shadow}) for name, ema in self.ema.items()}
        for name, module in self.plain.items():
            with whole(module, self.gather):  # under ZeRO-3 each rank holds a shard: check the whole tensors
                found[name] = non_finite({name: module.state_dict()})
        bad = [tensor for key in sorted(found) for tensor in found[key]]  # non_finite's order: by module name
        anywhere = self.accelerator.reduce(torch.tensor([len(bad)], device=self.accelerator.device), "sum")
        return bad or (["a tensor of another process"] if int(anywhere.item()) else [])

    def save_state(self) -> None:
        """A resumable state at the current step; written to `.partial`, renamed when complete. Weights
        holding NaN or infinity are refused before anything is written: the newest state stays the last
        good one. A failing disk removes the `.partial` folder and raises StorageError."""
        bad = self.non_finite_weights()
        if bad:
            raise CheckpointError(
                f"step {self.step}: NaN or infinity in {_names(bad)}; not saved, the newest state in "
                f"{self.layout.states} is the last good one (lower the learning rate, or check the data)"
            )
        final = checkpoint.state_dir(self.layout.states, self.step)
        partial = final.with_name(final.name + ".partial")
        main = self.accelerator.is_main_process
        try:
            with storage_errors(final):
                if main:  # files of a save killed earlier must not get into this state's manifest
                    shutil.rmtree(partial, ignore_errors=True)
                self.accelerator.wait_for_everyone()
                self.accelerator.save_state(str(partial), safe_serialization=True)
                self.accelerator.wait_for_everyone()
                if main:
                    ema = {n: e.state_dict() for n, e in self.ema.items()}
                    checkpoint.write_engine_state(partial, ema, self.engine_info())
                    if final.exists():
                        shutil.rmtree(final)
                    partial.rename(final)
                    checkpoint.prune_states(self.layout.states, self.cfg.keep_checkpoints, self.step)
        except StorageError:
            if main:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        self.accelerator.wait_for_everyone()

    def find_state(self) -> tuple[int, Path] | None:
        """The newest intact resumable state (checked by the main process, the same answer on every one),
        with a one-line warning per newer state passed over; CheckpointError if states exist but none is
        intact, None if there are none."""
        from accelerate.utils import broadcast_object_list

        root = self.layout.states
        answer = [checkpoint.find_resumable(root) if self.accelerator.is_main_process else None]
        found, skipped = broadcast_object_list(answer)[0]
        if self.accelerator.is_main_process:
            for folder, why in skipped:
                log.warning("resumable state %s skipped: %s", folder, why)
        if found is None and skipped:
            reasons = "; ".join(f"{folder.name}: {why}" for folder, why in skipped)
            raise CheckpointError(f"no intact resumable state in {root} ({reasons}); remove it to start over")
        return found

    def load_latest(self) -> None:
        found = self.find_state()
        if found is None:
            log.info("no resumable state in %s: starting at step 0", self.layout.states)
            return
        step, folder = found
        ema, info = checkpoint.read_engine_state(folder)
        if info["task"] != self.task.describe():
            raise InputError(
                f"{folder}: the checkpoint was trained with a different task/preset:\n"
                f"  checkpoint: {json.dumps(info['task'], sort_keys=True)}\n"
                f"  now:        {json.dumps(self.task.describe(), sort_keys=True)}"
            )
        if info["world_size"] != self.world:
            log.warning("resuming a %d-process state with %d processes", info["world_size"], self.world)
        self.accelerator.load_state(str(folder))
        for name, state in ema.items():
            self.ema[name].load_state_dict({k: v.to(self.accelerator.device) for k, v in state.items()})
        # The state's safetensors were checked; this also covers DeepSpeed's own weight files.
        bad = self.non_finite_weights()
        if bad:
            raise CheckpointError(f"{folder}: NaN or infinity in {_names(bad)}; refusing to resume into them")
        self.step = step
        log.info("resumed from %s (step %d)", folder, step)

    def set_lr(self) -> float:
        factor = lr_factor(self.step, self.cfg.steps, self.cfg.warmup_steps, self.cfg.min_lr_ratio)
        for name, optimizer in self.optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = self.base_lr[name] * factor
        return factor

    def train_step(self, micro: list[Batch]) -> dict[str, Tensor | float]:
        """One optimiser step of every module, in update order, over `grad_accum` micro-batches. Its loss
        terms (returned) and losses go to `self.losses` as computed: nothing is read back here."""
        terms: dict[str, Tensor | float] = {}
        losses: list[tuple[str, Tensor]] = []
        scratch: list[dict] = [{} for _ in micro]
        for name in self.order:
            model, optimizer = self.models[name], self.optimizers[name]
            if not self.deepspeed:
                optimizer.zero_grad(set_to_none=True)
            # The other modules run unwrapped and frozen in this phase: no DDP/DeepSpeed gradient hooks
            # fire for modules that are not being updated (DeepSpeed's ZeRO epilogue fails on them).
            view = {other: model if other == name else self.plain[other] for other in self.order}
            with frozen(self.plain, name):
                for index, batch in enumerate(micro):
                    last = index == len(micro) - 1
                    sync = nullcontext() if last or self.deepspeed else self.accelerator.no_sync(model)
                    with sync:
                        with loss_autocast(self.accelerator.mixed_precision, self.accelerator.device, self.deepspeed):
                            loss, parts = self.task.loss(name, view, batch, scratch[index])
                        losses.append((name, loss.detach()))  # checked for NaN/inf at the next flush
                        if self.deepspeed:
                            ds_engine: Any = model  # accelerate's prepare() made it a deepspeed.DeepSpeedEngine
                            ds_engine.backward(loss)  # the DeepSpeed engine scales by 1/grad_accum itself
                            ds_engine.step()  # steps only at the accumulation boundary; clips per its config
                        else:
                            self.accelerator.backward(loss / len(micro))
                    for key, value in parts.items():  # logged as loss/<module>/<term>
                        tag = f"loss/{name}/{key}"
                        terms[tag] = terms.get(tag, 0.0) + value / len(micro)
            if not self.deepspeed:
                if self.cfg.clip_norm > 0:
                    norm = self.accelerator.clip_grad_norm_(model.parameters(), self.cfg.clip_norm)
                    terms[f"grad_norm/{name}"] = norm
                optimizer.step()
        for name, ema in self.ema.items():
            ema.update(self.plain[name])
        self.losses.add(self.step, terms, losses)
        return terms

    def grid(self, batch: Batch) -> np.ndarray:
        """The task's image grid of the live weights, on every rank: under ZeRO-3 the forward gathers each
        layer's parameters from all ranks (DeepSpeed's hooks), so no rank may skip it; rank 0 saves it."""
        for module in self.plain.values():
            module.eval()
        with torch.no_grad():
            grid = self.task.images(self.plain, batch)
        for module in self.plain.values():
            module.train()
        return grid

    def parameter_digests(self) -> dict[str, str]:
        """sha256 of each module's whole parameters (gathered under ZeRO-3): the ranks of a run must agree bit
        for bit."""
        digests = {}
        for name, module in self.plain.items():
            digest = hashlib.sha256()
            with whole(module, self.gather):
                for key, value in sorted(module.state_dict().items()):
                    digest.update(key.encode() + value.detach().to("cpu", torch.float32).numpy().tobytes())
            digests[name] = digest.hexdigest()
        return digests

    def final_modules(self) -> dict[str, nn.Module] | None:
        """The trained modules on the main process (None elsewhere), in eval mode on its device: fresh builds
        holding the EMA weights where there are some, the live weights elsewhere. Fresh builds rather than
        copies of the live modules, which under ZeRO-3 hold one shard each (and DeepSpeed's hooks); the live
        weights are gathered on every rank, the EMA shadow is whole on each."""
        main = self.accelerator.is_main_process
        with torch.random.fork_rng(devices=[]):  # building initialises: the run's random stream stays as it was
            built = self.task.build() if main else {}
        for name, module in self.plain.items():
            if name in self.ema:
                if main:
                    built[name].load_state_dict(self.ema[name].state_dict())
                continue
            with whole(module, self.gather):  # every rank
                if main:
                    built[name].load_state_dict(module.state_dict())
        return {name: m.to(self.accelerator.device).eval() for name, m in built.items()} if main else None


def train(
    task: TrainTask,
    cfg: TrainConfig,
    batches: BatchSource,
    out: Path,
    *,
    meta: dict,
    resume: bool,
    deepspeed: dict | None = None,
    evaluate: Callable[[dict[str, nn.Module]], dict[str, float]] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `task` for `cfg.steps` optimiser steps and write the EMA weights to `out/model/`.

    `batches(epoch, rank, world_size)` yields per-process batch dicts (tensors on CPU; moved here);
    it is called again at every data epoch (`checkpoint_every` steps). `meta` (JSON-able: params,
    lineage) goes into model.json. `evaluate(models)` runs on the main process with the EMA weights
    after training; its figures go to DVCLive's metrics.json and the result.

    Losses are read back every `log_every` steps and at every state (DVCLive rows: each term's mean over
    the steps since the last row and over the processes); a NaN or infinite loss raises FloatingPointError
    there, on every process, before a state is written. Image grids are drawn on every rank (ZeRO-3's
    forward is collective) and saved by the main process.
    """
    layout = RunLayout(out)
    run = _Run(task, cfg, layout, deepspeed)
    from accelerate.utils import set_seed

    set_seed(cfg.seed * run.world + run.rank)  # per-rank randomness (noise, sampling)
    if resume:
        run.load_latest()  # restores weights, optimiser states and every rank's RNG state
    elif checkpoint.step_folders(layout.states):
        raise InputError(f"{layout.states} holds checkpoints of an earlier run: pass --resume, or use a new --out")
    monitor = Monitor(layout.live, layout.images, cfg.steps, run.step, run.accelerator.is_main_process, progress)
    images_per_step = cfg.batch_size * cfg.grad_accum * run.world
    stream: Iterator[Batch] | None = None
    log.info(
        "training %s for %d steps on %d process(es), %s, global batch %d",
        type(task).__name__, cfg.steps, run.world, run.accelerator.device, images_per_step,
    )  # fmt: skip
    while run.step < cfg.steps:
        if stream is None or run.step % cfg.checkpoint_every == 0:
            stream = iter(batches(run.step // cfg.checkpoint_every, run.rank, run.world))
        micro = [to_device(next(stream), run.accelerator.device) for _ in range(cfg.grad_accum)]
        factor = run.set_lr()
        run.train_step(micro)
        run.step += 1
        monitor.step(images_per_step)
        last = run.step == cfg.steps
        row, save = run.step % cfg.log_every == 0 or last, run.step % cfg.checkpoint_every == 0 or last
        if row or save:
            means = run.losses.flush(row)  # the only read-back of the losses; raises on a NaN/inf loss
            if means is not None:
                memory = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
                monitor.log(run.step, {**means, "lr": cfg.lr * factor}, memory)
        if run.step % cfg.image_every == 0 or last:
            monitor.image(run.step, run.grid(micro[0]))
        if save:
            run.save_state()
    evaluation: dict[str, float] = {}
    # The weights written below are those of the state just saved (or resumed, at the end), whose
    # NaN/infinity check refused a diverged run before it got here.
    final = run.final_modules()  # on every rank (ZeRO-3 gathers), the modules on the main process only
    if final is not None:
        if evaluate is not None:
            evaluation = evaluate(final)
            monitor.summary(evaluation)
        info = {**meta, "task": task.describe(), "step": run.step, "ema_decay": cfg.ema_decay}
        checkpoint.write_model(layout.model, {n: final[n].state_dict() for n in run.ema}, info)
    monitor.close()
    digests = run.parameter_digests()
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return TrainResult(
        step=run.step,
        rank=run.rank,
        last_terms=run.losses.last,
        loss_curve=run.losses.curve,
        evaluation=evaluation,
        parameter_digests=digests,
        layout=layout,
    )
