"""The pieces of one step of the training engine (vasa/training/engine.py): phase isolation, the loss's
autocast, ZeRO-3 gathers, the memory and speed switches, and the loss log.

The loss log keeps every loss term on the device and reads the terms back only at the steps where a
metrics row is written or a state saved: the engine adds no host sync per micro-step (on a GPU, a
`float(loss)` or `if not torch.isfinite(loss)` waits for every queued kernel, and the next step cannot be
queued meanwhile). The check for a non-finite loss moves to those steps: a diverged run still stops
before a state is written, and it stops on every process at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vasa.core.errors import InputError

Batch = dict[str, Tensor]
Gather = Callable[[list[nn.Parameter]], AbstractContextManager]  # ZeRO-3: parameters made whole for a block


@contextmanager
def frozen(models: dict[str, nn.Module], active: str) -> Iterator[None]:
    """requires_grad off for every module but `active` (StyleGAN-style phase isolation)."""
    saved = {}
    for name, module in models.items():
        if name != active:
            for param in module.parameters():
                saved[param] = param.requires_grad
                param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in saved.items():
            param.requires_grad_(flag)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def zero3_gather(params: list[nn.Parameter]) -> AbstractContextManager:
    """DeepSpeed's GatheredParameters: the ZeRO-3 shards of `params` made whole on every rank for the block,
    read-only (modifier_rank None). A collective: every rank enters it, or the ones that do wait forever."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def whole(module: nn.Module, gather: Gather | None) -> AbstractContextManager:
    """`module`'s parameters whole for the block: gathered under ZeRO-3 (collective), as they are otherwise."""
    return gather(list(module.parameters())) if gather is not None else nullcontext()


def speed_and_memory(task: object, modules: dict[str, nn.Module], checkpointing: bool, compile_: bool) -> None:
    """Params `train.activation_checkpointing`: the task's `checkpoint_activations(modules)` makes its
    heavy blocks recompute their activations in the backward pass (torch.utils.checkpoint: less memory,
    one more forward of those blocks; the weights come out the same). `train.compile`: every module's
    forward through torch.compile, in place (`nn.Module.compile`: state_dict keys and checkpoints unchanged).
    Both off by default; docs/BENCHMARKS.md has what they cost and save."""
    if checkpointing:
        hook = getattr(task, "checkpoint_activations", None)
        if hook is None:
            raise InputError(f"train.activation_checkpointing: {type(task).__name__} has no blocks to checkpoint")
        hook(modules)
    if compile_:
        for module in modules.values():
            module.compile()


@dataclass(frozen=True)
class _Pending:
    step: int  # steps done before this one (the engine's counter while it ran)
    terms: list[str]  # logged tags, then
    losses: list[str]  # the module of each micro-batch's loss
    values: Tensor  # (len(terms) + len(losses),) fp32 on the device


def _scalar(value: Tensor | float, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().reshape(()).to(device, torch.float32)
    return torch.tensor(float(value), dtype=torch.float32, device=device)


class LossLog:
    """Per-step loss terms, kept on `device` until `flush`: one device-to-host copy and one small
    exchange between processes (`gather`: accelerate's gather_object) per flush, none per step.

    `curve` holds this process's terms of every flushed step (the `loss/...` ones) and `last` the last
    flushed step's terms (grad norms too); a flush with `row=True` also returns the metrics row: each
    term's mean over the steps since the previous row and over the processes that logged it.
    """

    def __init__(self, device: torch.device, gather: Callable[[list], list]):
        self.device, self.gather = device, gather
        self.pending: list[_Pending] = []
        self.window: dict[str, list[float]] = {}  # tag -> [sum, count] since the last row
        self.curve: list[dict[str, float]] = []
        self.last: dict[str, float] = {}

    def add(self, step: int, terms: dict[str, Tensor | float], losses: list[tuple[str, Tensor]]) -> None:
        """One step's terms (averaged over its micro-batches) and each micro-batch's loss per module, as
        computed (detached here, nothing read back)."""
        values = [_scalar(v, self.device) for v in terms.values()] + [_scalar(v, self.device) for _, v in losses]
        self.pending.append(_Pending(step, list(terms), [name for name, _ in losses], torch.stack(values)))

    def flush(self, row: bool) -> dict[str, float] | None:
        """Read the pending steps back. FloatingPointError "step N: non-finite <module> loss <value>" on every
        process when a loss was NaN or infinite on any (the first one: earliest step, then process)."""
        host = torch.cat([p.values for p in self.pending]).tolist() if self.pending else []
        first_bad = None
        offset = 0
        for pending in self.pending:
            values = host[offset : offset + len(pending.values)]
            offset += len(pending.values)
            terms = dict(zip(pending.terms, values, strict=False))
            for name, loss in zip(pending.losses, values[len(pending.terms) :], strict=True):
                if first_bad is None and not math.isfinite(loss):
                    first_bad = (pending.step, name, loss)
            self.curve.append({k: v for k, v in terms.items() if k.startswith("loss")})
            self.last = terms
            for tag, value in terms.items():
                total = self.window.setdefault(tag, [0.0, 0])
                total[0] += value
                total[1] += 1
        self.pending = []
        everyone = self.gather([(first_bad, self.window if row else None)])
        bad = [found for found, _ in everyone if found is not None]
        if bad:
            step, name, value = min(bad, key=lambda found: found[0])
            raise FloatingPointError(f"step {step}: non-finite {name} loss {value}")
        if not row:
            return None
        merged: dict[str, list[float]] = {}
        for _, window in everyone:
            for tag, (total, count) in window.items():
                into = merged.setdefault(tag, [0.0, 0])
                into[0] += total
                into[1] += count
        self.window = {}
        return {tag: total / count for tag, (total, count) in merged.items()}
