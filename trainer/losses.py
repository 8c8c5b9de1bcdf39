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


class DDPMObjective:
    """The objective of the SD and SDXL scripts: noise (plus offset noise), uniform integer
    timesteps, the scheduler's `add_noise`, an epsilon or velocity target, MSE (Min-SNR weighted
    on request). Draws exactly what and where the scripts draw."""

    def __init__(self, scheduler, noise_offset: float = 0.0, snr_gamma: float | None = None):
        self.scheduler = scheduler
        self.noise_offset = noise_offset
        self.snr_gamma = snr_gamma

    def draw(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn_like(latents)
        if self.noise_offset:
            # https://www.crosslabs.org//blog/diffusion-with-offset-noise
            noise += self.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device)
        timesteps = torch.randint(
            0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
        ).long()
        return noise, timesteps

    def noisy_input(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return training_target(self.scheduler, latents, noise, timesteps)

    def prediction(self, model_pred: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return model_pred

    def loss(self, model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return diffusion_loss(model_pred, target, self.scheduler, timesteps, self.snr_gamma)
