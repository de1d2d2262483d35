"""Optimizer and learning-rate schedule (ours, handed to DeepSpeed as client objects)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from trainer.config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig, num_steps: int) -> float:
    """Multiplier of cfg.lr for the update that follows `step` completed updates of a run of
    `num_steps` (train.steps, or train.epochs resolved: the trainer's TrainState.num_steps)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = max(1, num_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.lr_decay == "constant":
        return 1.0
    if cfg.lr_decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # No decay on biases and norm scales (1-D tensors), as in GPT-2/T5 practice. ds_shape: a
    # parameter partitioned at load time (ZeRO-3 zero.Init) is an empty 1-D tensor; its
    # shape is kept there.
    def is_matrix(p: torch.nn.Parameter) -> bool:
        return len(getattr(p, "ds_shape", p.shape)) >= 2

    decay = [p for p in model.parameters() if p.requires_grad and is_matrix(p)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not is_matrix(p)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # DeepSpeed drops an empty group, and the LR scheduler must see the groups it will step.
    return [group for group in groups if group["params"]]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, offload_optimizer: bool) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    if offload_optimizer:
        # ZeRO-Offload steps the optimizer on the CPU; DeepSpeed refuses a client torch
        # optimizer there because it is several times slower than its vectorised CPU Adam.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    get_num_steps: Callable[[], int]) -> torch.optim.lr_scheduler.LambdaLR:
    """`get_num_steps` is asked at every step, not now: a resumed run learns its length from
    its checkpoint, after the engine (and this scheduler) exist."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, get_num_steps()))
