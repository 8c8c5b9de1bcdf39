"""The optimizer and learning-rate schedule of a run, as the config names them.

AdamW is the scripts' default and what every loss curve compared with them uses. Prodigy
(`prodigyopt`, the diffusers DreamBooth scripts' `--optimizer prodigy`) estimates its own step
size, so it is usually run at learning_rate 1.0; Adafactor (transformers) keeps factored second
moments; 8-bit AdamW (bitsandbytes) needs CUDA. Every one keeps its whole state in
`state_dict()`, which accelerate writes into each checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import importlib.util

import torch
from diffusers.optimization import get_scheduler

from trainer.config import CommonConfig, ConfigError


def build_optimizer(config: CommonConfig, parameters: list[torch.nn.Parameter], learning_rate: float,
                    device: torch.device) -> torch.optim.Optimizer:
    """The configured optimizer over `parameters` (the LoRA weights)."""
    name = config.optimizer
    betas = (config.adam_beta1, config.adam_beta2)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=learning_rate, betas=betas,
                                 weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    if name == "adamw8bit":
        if torch.device(device).type != "cuda":
            raise ConfigError(f"optimizer: adamw8bit needs a CUDA device (bitsandbytes), this run is on "
                              f"{torch.device(device).type}; use optimizer adamw")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("optimizer: adamw8bit needs bitsandbytes, which is not installed here "
                              "(pip install bitsandbytes); use optimizer adamw")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, lr=learning_rate, betas=betas,
                                   weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(parameters, lr=learning_rate, betas=betas, beta3=config.prodigy_beta3,
                       weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
                       decouple=config.prodigy_decouple, use_bias_correction=config.prodigy_use_bias_correction,
                       safeguard_warmup=config.prodigy_safeguard_warmup, d_coef=config.prodigy_d_coef)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate (relative_step off) so that the schedule drives it as it does
        # every other optimizer's.
        return Adafactor(parameters, lr=learning_rate, clip_threshold=config.adafactor_clip_threshold,
                         decay_rate=config.adafactor_decay_rate, beta1=config.adafactor_beta1,
                         weight_decay=config.adafactor_weight_decay,
                         scale_parameter=config.adafactor_scale_parameter, relative_step=False,
                         warmup_init=False)
    raise ConfigError(f"optimizer: {name!r} is not supported")


def build_scheduler(config: CommonConfig, optimizer: torch.optim.Optimizer, warmup_steps: int,
                    training_steps: int):
    """diffusers' schedule by name, with the cycles of cosine_with_restarts and the power of
    polynomial (each ignored by the other schedules, as in the scripts)."""
    return get_scheduler(config.lr_scheduler, optimizer=optimizer, num_warmup_steps=warmup_steps,
                         num_training_steps=training_steps, num_cycles=config.lr_num_cycles,
                         power=config.lr_power)


def describe(config: CommonConfig) -> str:
    """The optimizer and its options, for the LoRA file's `ss_optimizer` metadata."""
    if config.optimizer == "adafactor":
        return (f"transformers.optimization.Adafactor(clip_threshold={config.adafactor_clip_threshold},"
                f"decay_rate={config.adafactor_decay_rate},beta1={config.adafactor_beta1},"
                f"weight_decay={config.adafactor_weight_decay})")
    common = (f"betas=({config.adam_beta1}, {config.adam_beta2}),"
              f"weight_decay={config.adam_weight_decay},eps={config.adam_epsilon}")
    if config.optimizer == "prodigy":
        return (f"prodigyopt.Prodigy({common},beta3={config.prodigy_beta3},decouple={config.prodigy_decouple},"
                f"use_bias_correction={config.prodigy_use_bias_correction},"
                f"safeguard_warmup={config.prodigy_safeguard_warmup},d_coef={config.prodigy_d_coef})")
    if config.optimizer == "adamw8bit":
        return f"bitsandbytes.optim.AdamW8bit({common})"
    return f"torch.optim.AdamW({common})"
