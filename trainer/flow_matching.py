"""The rectified-flow objective of diffusers' `train_dreambooth_lora_flux.py` and
`train_dreambooth_lora_sd3.py`, shared by the Flux and SD3 families.

Per batch, as both scripts draw it: noise `randn_like(x)` first, then `u` from
`compute_density_for_timestep_sampling(weighting_scheme, ...)` (on the CPU generator, the
function's default device), the timestep `scheduler.timesteps[(u * num_train_timesteps).long()]`
and its sigma looked up in the same scheduler. The scheduler is the pipeline's
`FlowMatchEulerDiscreteScheduler` as constructed: its static `shift` is in its grid (SD3's 3.0),
a dynamically shifting one (Flux dev) keeps the unshifted grid, as the scripts train.

Noisy input `(1 - sigma) * x + sigma * noise`, target `noise - x` (or, SD3's default
`precondition_outputs`, the prediction mapped back to `noisy - sigma * pred` against `x`), loss
`mean over examples of mean over elements of weighting * (pred - target) ** 2` in fp32 with the
weighting of `compute_loss_weighting_for_sd3`.
"""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


class FlowMatchingObjective:
    """Draws, noises, targets and weights a batch as the flow-matching scripts do."""

    def __init__(self, scheduler, weighting_scheme: str = "none", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, precondition_outputs: bool = False):
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme: {weighting_scheme!r} is not one of {', '.join(WEIGHTING_SCHEMES)}")
        self.scheduler = scheduler
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.precondition_outputs = precondition_outputs

    def draw(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise, then timesteps (the scripts' order of random draws)."""
        noise = torch.randn_like(latents)
        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme, batch_size=latents.shape[0], logit_mean=self.logit_mean,
            logit_std=self.logit_std, mode_scale=self.mode_scale,
        )
        indices = (u * self.scheduler.config.num_train_timesteps).long()
        return noise, self.scheduler.timesteps[indices].to(device=latents.device)

    def sigmas(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Each timestep's sigma from the scheduler's grid, shaped to broadcast over `like`."""
        schedule = self.scheduler.timesteps.to(timesteps.device)
        indices = [(schedule == t).nonzero().item() for t in timesteps]
        sigma = self.scheduler.sigmas.to(device=like.device, dtype=like.dtype)[indices].flatten()
        return sigma.reshape(-1, *([1] * (like.ndim - 1)))

    def noisy_input(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = self.sigmas(timesteps, latents)
        return (1.0 - sigmas) * latents + sigmas * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return latents if self.precondition_outputs else noise - latents

    def prediction(self, model_pred: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """SD3's preconditioning (EDM, section 5): the output read as the clean latents."""
        if not self.precondition_outputs:
            return model_pred
        return model_pred * -self.sigmas(timesteps, noisy) + noisy

    def weighting(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return compute_loss_weighting_for_sd3(weighting_scheme=self.weighting_scheme,
                                              sigmas=self.sigmas(timesteps, like))

    def loss(self, model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        weighting = self.weighting(timesteps, target)
        per_example = torch.mean(
            (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
        return per_example.mean()
