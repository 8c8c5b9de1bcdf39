"""The diffusion training objective: target, Min-SNR weights and the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v_prediction).

    Args:
        noise_scheduler: a diffusers scheduler whose config holds `prediction_type`.
        latents: clean latents x0.
        noise: the noise added to them.
        timesteps: one timestep per sample.
    Returns:
        The target tensor, shaped like `latents`.
    """
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type: unknown prediction type {prediction_type!r}")


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR (https://arxiv.org/abs/2303.09556).

    min(SNR(t), gamma) divided by SNR(t) for epsilon prediction, or by SNR(t) + 1 for
    v_prediction, whose loss already carries a factor of SNR + 1.
    """
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if noise_scheduler.config.prediction_type == "epsilon":
        return weights / snr
    if noise_scheduler.config.prediction_type == "v_prediction":
        return weights / (snr + 1)
    raise ValueError(f"prediction_type: Min-SNR needs epsilon or v_prediction, not {noise_scheduler.config.prediction_type!r}")


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    noise_scheduler,
    timesteps: torch.Tensor,
    snr_gamma: float | None,
) -> torch.Tensor:
    """Mean squared error in fp32, Min-SNR weighted per sample when `snr_gamma` is set."""
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape))))
    return (loss * min_snr_weights(noise_scheduler, timesteps, snr_gamma)).mean()
