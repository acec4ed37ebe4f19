"""Where the engine (vasa/training/engine.py) runs and in what precision: one Accelerator for one CPU, one
GPU, N GPUs or many nodes; DeepSpeed ZeRO-2/3 from a JSON template in cluster/deepspeed/ with its "auto"
fields filled from params; the autocast the loss runs under."""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext

import torch

from vasa.core.config import TrainConfig
from vasa.core.errors import InputError


def resolve_precision(precision: str) -> str:
    """Accelerate's mixed_precision for a TrainConfig.precision: autocast only where it pays (GPU)."""
    if precision == "auto":
        cuda = torch.cuda.is_available()
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if precision in ("bf16", "fp16") and not torch.cuda.is_available():
        raise InputError(f"precision {precision} needs a GPU; use fp32 or auto on CPU")
    return {"fp32": "no"}.get(precision, precision)


def deepspeed_settings(template: dict, cfg: TrainConfig, mixed_precision: str) -> dict:
    """A DeepSpeed config with its "auto" fields filled from TrainConfig (batch, accumulation,
    clipping, precision), so the JSON in cluster/deepspeed/ never repeats a value from params."""
    ds = copy.deepcopy(template)
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds.pop("train_batch_size", None)  # DeepSpeed derives it: micro batch x accumulation x processes
    ds["gradient_clipping"] = cfg.clip_norm
    ds["bf16"] = {"enabled": mixed_precision == "bf16"}
    ds["fp16"] = {"enabled": mixed_precision == "fp16"}
    return ds


def make_accelerator(cfg: TrainConfig, names: list[str], deepspeed: dict | None):
    """One Accelerator for the run. On a machine without CUDA it is `cpu=True` with gloo (without
    cpu=True, 2 launched processes train independently, silently; tests/test_cluster_configs.py). With DeepSpeed,
    one plugin per module (Accelerate's multi-model API), all from the same JSON."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, InitProcessGroupKwargs

    no_cuda = not torch.cuda.is_available()
    # cpu=True would switch DeepSpeed off (Accelerate only enables it when cpu is False); DeepSpeed
    # then finds no GPU and runs on the CPU over gloo.
    cpu = no_cuda and deepspeed is None
    # Frozen modules (vasa/training/steps.py `frozen`) take no gradient in another module's phase: DDP must treat
    # their parameters as unused rather than wait for them.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    mixed = resolve_precision(cfg.precision)
    plugins = None
    if deepspeed is not None:
        if no_cuda:  # DeepSpeed defaults to NCCL; on CPU it works over gloo
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        settings = deepspeed_settings(deepspeed, cfg, mixed)
        plugins = {name: DeepSpeedPlugin(hf_ds_config=copy.deepcopy(settings)) for name in names}
    return Accelerator(
        cpu=cpu,
        mixed_precision=mixed,
        kwargs_handlers=handlers,
        deepspeed_plugins=plugins,
        step_scheduler_with_optimizer=False,
    )


def loss_autocast(mixed_precision: str, device: torch.device, deepspeed: bool) -> AbstractContextManager:
    """The autocast the loss runs under. Accelerate autocasts a prepared model's forward itself, except
    under DeepSpeed, whose bf16/fp16 modules hold half-precision weights and would meet the loaders'
    fp32 batches ("Input type (float) and bias type (c10::BFloat16)"): there the engine autocasts."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if not deepspeed or dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)
