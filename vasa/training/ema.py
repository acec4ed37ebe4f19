"""Exponential moving average of model weights: the stage's output is the EMA generator, as in DiT
and StyleGAN-family training, because it is smoother than the last raw iterate."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn


class EMA:
    """fp32 shadow copy of a module's floating-point parameters and buffers.

    `update` blends: shadow <- decay * shadow + (1 - decay) * current; integer buffers (e.g. batch-norm
    counters) are copied. Keys are the unwrapped module's state_dict keys, so the shadow loads straight
    into a freshly built module with `load_state_dict`.
    """

    def __init__(
        self,
        module: nn.Module,
        decay: float,
        gather: Callable[[list[nn.Parameter]], AbstractContextManager] | None = None,
    ):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self._gather = gather  # ZeRO-3: a context that gathers partitioned parameters (deepspeed.zero)
        with self._gathered(module):
            self.shadow = {k: v.detach().to(torch.float32).clone() for k, v in module.state_dict().items()}

    def _gathered(self, module: nn.Module) -> AbstractContextManager:
        return self._gather(list(module.parameters())) if self._gather else nullcontext()

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        with self._gathered(module):
            for key, value in module.state_dict().items():
                target = self.shadow[key]
                if value.is_floating_point():
                    target.mul_(self.decay).add_(value.detach().to(target.device, torch.float32), alpha=1 - self.decay)
                else:
                    target.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
            raise ValueError(f"EMA state does not match the module: missing {missing[:5]}, unexpected {extra[:5]}")
        for key, value in state.items():
            self.shadow[key].copy_(value)
