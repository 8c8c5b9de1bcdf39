"""`train(config, on_event)`: the LoRA loop of diffusers' `train_text_to_image_lora.py`.

Setup follows the script's order, because every random draw must land where the script's does
(LoRA init, data order, then per step the VAE latent sample, noise, timesteps): a user moving
from the script gets its loss curve. Where this loop differs from the script, it says why.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params

from trainer import checkpoints, control, data, validation
from trainer.config import ConfigError, TrainConfig
from trainer.events import Event, EventSink, Throughput, ignore_events
from trainer.losses import diffusion_loss, training_target
from trainer.model import (
    TEXT_ENCODER_TARGET_MODULES, UNET_TARGET_MODULES, WEIGHT_DTYPES, Components, load_adapter_state,
    KOHYA_WEIGHTS_NAME, load_components, lora_config, save_adapter_state, save_kohya_lora, save_lora,
)

logger = logging.getLogger("trainer")


@dataclass
class Run:
    """Everything a training run holds once set up."""

    config: TrainConfig
    accelerator: Accelerator
    components: Components
    weight_dtype: torch.dtype
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    lora_parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    dataloader: torch.utils.data.DataLoader
    sampler: data.EpochBatchSampler
    num_examples: int
    cached: bool
    max_train_steps: int
    num_train_epochs: int
    num_update_steps_per_epoch: int
    trainable: tuple = field(default_factory=tuple)
    # The memory layout of the VAE's output here; sampling follows it (see draw_inputs).
    latent_memory_format: torch.memory_format = torch.contiguous_format


@dataclass
class TrainResult:
    """What a finished run produced."""

    lora_path: Path
    global_step: int
    losses: list[float]
    validation_images: list[str]


def train(config: TrainConfig, on_event: EventSink = ignore_events) -> TrainResult:
    """Train a LoRA as configured, reporting progress to `on_event`; raises on failure after
    reporting an `error` event."""
    try:
        return _train(config, on_event)
    except Exception as error:
        # Config, data and model errors already say what is wrong and where.
        message = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
        on_event(Event("error", message=message))
        raise


def setup(config: TrainConfig, data_folder: Path | None = None) -> Run:
    """Build the accelerator, models with LoRA, optimizer, data and schedule, in the script's order.

    `data_folder` is where the images are (a zip's extraction); by default `train_data_dir`.
    """
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but no CUDA device is available")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps one process-wide state; several runs in one process (tests, notebooks)
        # may each choose their own precision.
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        cpu=config.device == "cpu",
        project_config=ProjectConfiguration(project_dir=config.output_dir),
    )
    if config.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        raise ConfigError("mixed_precision: fp16 needs a CUDA device; use bf16 or no here")
    if config.seed is not None:
        set_seed(config.seed)
    if accelerator.is_main_process:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)

    components = load_components(config)
    unet, vae, text_encoder = components.unet, components.vae, components.text_encoder
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
    weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)

    # LoRA init draws the first random numbers of the run.
    unet.add_adapter(lora_config(config, UNET_TARGET_MODULES))
    trainable = [unet]
    if config.train_text_encoder:
        text_encoder.add_adapter(lora_config(config, TEXT_ENCODER_TARGET_MODULES))
        trainable.append(text_encoder)
    if config.mixed_precision != "no":
        cast_training_params(trainable, dtype=torch.float32)
    # A list, not the script's `filter(...)`: the script's iterator is exhausted by the optimizer,
    # so its later clip_grad_norm_ clips nothing.
    lora_parameters = [p for model in trainable for p in model.parameters() if p.requires_grad]
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    learning_rate = config.learning_rate
    if config.scale_lr:
        learning_rate *= config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
    optimizer = torch.optim.AdamW(
        lora_parameters, lr=learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
    )

    dataset, cached, num_examples = _build_dataset(
        config, data_folder or Path(config.train_data_dir), components, accelerator.device, weight_dtype
    )
    sampler = data.EpochBatchSampler(len(dataset), config.train_batch_size, accelerator.num_processes)
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=data.collate,
        num_workers=0 if cached else config.dataloader_num_workers,
    )

    # The schedule counts scheduler steps on every process, as the script's does.
    steps_per_epoch = math.ceil(math.ceil(len(dataloader) / accelerator.num_processes) / config.gradient_accumulation_steps)
    if config.max_train_steps is None:
        scheduler_steps = config.num_train_epochs * steps_per_epoch * accelerator.num_processes
    else:
        scheduler_steps = config.max_train_steps * accelerator.num_processes
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=scheduler_steps,
    )
    prepared = accelerator.prepare(*trainable, optimizer, dataloader, lr_scheduler)
    trainable = tuple(prepared[: len(trainable)])
    optimizer, dataloader, lr_scheduler = prepared[len(trainable):]
    steps_per_epoch = math.ceil(len(dataloader) / config.gradient_accumulation_steps)
    max_train_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    _register_checkpoint_hooks(accelerator, trainable)

    return Run(
        config=config, accelerator=accelerator, components=components, weight_dtype=weight_dtype,
        unet=trainable[0], text_encoder=trainable[1] if config.train_text_encoder else text_encoder,
        lora_parameters=lora_parameters, optimizer=optimizer, lr_scheduler=lr_scheduler,
        dataloader=dataloader, sampler=sampler, num_examples=num_examples, cached=cached,
        max_train_steps=max_train_steps, num_train_epochs=math.ceil(max_train_steps / steps_per_epoch),
        num_update_steps_per_epoch=steps_per_epoch, trainable=trainable,
        latent_memory_format=getattr(dataset, "memory_format", torch.contiguous_format),
    )


def draw_inputs(run: Run, batch: dict) -> tuple[torch.Tensor, ...]:
    """Encode, noise: latents, noise, timesteps and text embeddings for one batch (the random part)."""
    components, config = run.components, run.config
    if "latent_params" in batch:  # cached posterior, sampled anew each step as the VAE would
        # randn_like(latents) fills in memory order, so the cached parameters take the layout the
        # VAE gives them (channels-last on some CPUs); otherwise the noise would differ.
        params = batch["latent_params"].contiguous(memory_format=run.latent_memory_format)
        latents = DiagonalGaussianDistribution(params).sample()
    else:
        latents = components.vae.encode(batch["pixel_values"].to(dtype=run.weight_dtype)).latent_dist.sample()
    latents = latents * components.vae.config.scaling_factor

    noise = torch.randn_like(latents)
    if config.noise_offset:
        # https://www.crosslabs.org//blog/diffusion-with-offset-noise
        noise += config.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device)
    timesteps = torch.randint(
        0, components.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
    ).long()

    if "encoder_hidden_states" in batch:
        encoder_hidden_states = batch["encoder_hidden_states"]
    else:
        encoder_hidden_states = run.text_encoder(batch["input_ids"], return_dict=False)[0]
    return latents, noise, timesteps, encoder_hidden_states


def optimize(run: Run, latents, noise, timesteps, encoder_hidden_states) -> tuple[float, float | None]:
    """Predict, loss, backward, clip, step. Returns the loss gathered across processes and the
    gradient norm before clipping (None on accumulation steps that do not sync)."""
    scheduler = run.components.noise_scheduler
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    target = training_target(scheduler, latents, noise, timesteps)
    model_pred = run.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    loss = diffusion_loss(model_pred, target, scheduler, timesteps, run.config.snr_gamma)

    # Every process's mean loss, for logging.
    avg_loss = run.accelerator.gather(loss.repeat(latents.shape[0])).mean().item()
    run.accelerator.backward(loss)
    grad_norm = None
    if run.accelerator.sync_gradients:
        grad_norm = float(run.accelerator.clip_grad_norm_(run.lora_parameters, run.config.max_grad_norm))
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad()
    return avg_loss, grad_norm


def _train(config: TrainConfig, on_event: EventSink) -> TrainResult:
    with data.dataset_folder(config.train_data_dir) as folder:
        return _train_in(setup(config, folder), on_event)


def _train_in(run: Run, on_event: EventSink) -> TrainResult:
    config = run.config
    accelerator = run.accelerator
    emit = on_event if accelerator.is_main_process else ignore_events
    global_step, first_epoch = _resume(run)
    total_batch = config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    emit(Event(
        "start", step=global_step, total_steps=run.max_train_steps, epoch=first_epoch,
        message=f"{run.num_examples} images, batch {total_batch}, latent cache {'on' if run.cached else 'off'}",
        data={"num_examples": run.num_examples, "total_batch_size": total_batch, "cached": run.cached,
              "num_train_epochs": run.num_train_epochs, "device": str(accelerator.device)},
    ))
    throughput = Throughput(total_batch, run.max_train_steps, global_step)
    losses: list[float] = []
    images: list[str] = []

    for epoch in range(first_epoch, run.num_train_epochs):
        for model in run.trainable:
            model.train()
        start_position = run.sampler.resume_point.position if run.sampler.resume_point else 0
        train_loss = 0.0
        for step, batch in enumerate(run.dataloader):
            with accelerator.accumulate(*run.trainable):
                loss, grad_norm = optimize(run, *draw_inputs(run, batch))
                train_loss += loss / config.gradient_accumulation_steps

            if accelerator.sync_gradients:
                global_step += 1
                losses.append(train_loss)
                images_per_s, eta_s = throughput.measure(global_step)
                emit(Event("step", step=global_step, total_steps=run.max_train_steps, epoch=epoch,
                           loss=train_loss, lr=run.lr_scheduler.get_last_lr()[0], grad_norm=grad_norm,
                           images_per_s=images_per_s, eta_s=eta_s))
                train_loss = 0.0
                stopping = control.stop_requested()  # read once: asked to hand over (trainer/control.py)
                if global_step % config.checkpointing_steps == 0 or stopping:
                    batches_done = start_position + (step + 1) * accelerator.num_processes
                    emit(_save_checkpoint(run, global_step, epoch, batches_done))
                if stopping:
                    raise control.StopRequested(global_step)
                if config.validation_steps and global_step % config.validation_steps == 0:
                    images += _validate(run, f"step-{global_step:06d}", global_step, emit)
            if global_step >= run.max_train_steps:
                break

        if config.validation_prompt and not config.validation_steps and epoch % config.validation_epochs == 0:
            images += _validate(run, f"epoch-{epoch:04d}-step-{global_step:06d}", global_step, emit)

    accelerator.wait_for_everyone()
    lora_path = Path(config.output_dir) / "pytorch_lora_weights.safetensors"
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(run.unet)
        text_encoder = accelerator.unwrap_model(run.text_encoder) if config.train_text_encoder else None
        lora_path = save_lora(config.output_dir, unet, text_encoder)
        save_kohya_lora(config.output_dir, config.effective_lora_alpha, unet, text_encoder)
        (Path(config.output_dir) / "training_config.json").write_text(config.model_dump_json(indent=2))
        if config.validation_prompt:
            images += _final_validation(run, lora_path.parent, global_step, emit)
    accelerator.end_training()
    emit(Event("done", step=global_step, total_steps=run.max_train_steps, loss=losses[-1] if losses else None,
               paths=[str(lora_path), str(Path(config.output_dir) / KOHYA_WEIGHTS_NAME)],
               message=f"saved {lora_path}"))
    return TrainResult(lora_path=lora_path, global_step=global_step, losses=losses, validation_images=images)


# --------------------------------------------------------------------------------------------
# Data and the latent cache


def _build_dataset(config: TrainConfig, folder: Path, components: Components, device, dtype):
    """The dataset to train on, and whether it serves cached latents instead of pixels."""
    transform = data.ImageTransform(config.resolution, config.center_crop, config.random_flip,
                                    config.image_interpolation_mode)
    examples = data.scan_examples(folder, config.caption_column, config.missing_captions)
    examples = data.select_samples(examples, config.max_train_samples, config.seed)
    if _use_cache(config, examples, transform):
        return _cached_dataset(config, examples, transform, components, device, dtype), True, len(examples)
    return data.ImageCaptionDataset(examples, transform, components.tokenizer), False, len(examples)


def _use_cache(config: TrainConfig, examples: list[data.Example], transform: data.ImageTransform) -> bool:
    """Cache when every crop is fixed and captions are single strings (unless turned off)."""
    if config.cache_latents is False:
        return False
    random_crops = [e for e in examples if not transform.crop_is_fixed(e.size)]
    multi_caption = [e for e in examples if not isinstance(e.caption, str)]
    if config.cache_latents and (random_crops or multi_caption):
        culprit = (random_crops or multi_caption)[0].path.name
        reason = "is cropped at random each step (set center_crop)" if random_crops else "has several captions"
        raise ConfigError(f"cache_latents: cannot cache, image {culprit} {reason}")
    return not random_crops and not multi_caption


@torch.no_grad()
def _cached_dataset(config, examples, transform, components: Components, device, dtype) -> data.CachedLatentDataset:
    """Encode every image (and its mirror image when flipping) once, and every caption once."""
    params, flipped = [], []
    for start in range(0, len(examples), config.train_batch_size):
        chunk = examples[start:start + config.train_batch_size]
        pixels = torch.stack([transform(data.load_rgb(e.path), flip=False) for e in chunk]).to(device, dtype)
        params.append(components.vae.encode(pixels).latent_dist.parameters)
        if config.random_flip:
            flipped.append(components.vae.encode(pixels.flip(-1)).latent_dist.parameters)
    input_ids = data.tokenize(components.tokenizer, [e.caption for e in examples]).to(device)
    text = input_ids
    if not config.train_text_encoder:
        text = torch.cat([
            components.text_encoder(input_ids[i:i + config.train_batch_size], return_dict=False)[0]
            for i in range(0, len(input_ids), config.train_batch_size)
        ])
    dataset = data.CachedLatentDataset(
        torch.cat(params), torch.cat(flipped) if flipped else None, text,
        text_is_embedding=not config.train_text_encoder,
    )
    if params[0].is_contiguous(memory_format=torch.channels_last) and not params[0].is_contiguous():
        dataset.memory_format = torch.channels_last
    return dataset


# --------------------------------------------------------------------------------------------
# Checkpoints


def _register_checkpoint_hooks(accelerator: Accelerator, trainable: tuple) -> None:
    """Checkpoints hold only the adapters, not a copy of the frozen base model."""
    names = ["unet", "text_encoder"][: len(trainable)]

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for name, model in zip(names, models):
                save_adapter_state(Path(output_dir), name, accelerator.unwrap_model(model))
        weights.clear()

    def load_hook(models, input_dir):
        for name, model in zip(names, list(models)):
            load_adapter_state(Path(input_dir), name, accelerator.unwrap_model(model))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _save_checkpoint(run: Run, global_step: int, epoch: int, batches_done: int) -> Event:
    config, accelerator, sampler = run.config, run.accelerator, run.sampler
    path = Path(config.output_dir) / f"checkpoint-{global_step}"
    if accelerator.is_main_process:
        checkpoints.prune_checkpoints(config.output_dir, config.checkpoints_total_limit)
        accelerator.save_state(str(path))
        if batches_done >= len(sampler):  # end of epoch: the next one starts afresh
            state = checkpoints.TrainerState(global_step, epoch + 1, 0, None)
            rng_before = None
        else:
            state = checkpoints.TrainerState(global_step, epoch, batches_done, sampler.epoch_seed)
            # The loader has already read the next batch; keep the random state from before it.
            lookahead = sampler.position == batches_done + accelerator.num_processes - 1
            rng_before = sampler.rng_at_position if lookahead else None
        checkpoints.write_state(path, state, rng_before, config.model_dump(mode="json"))
        unet = accelerator.unwrap_model(run.unet)
        text_encoder = accelerator.unwrap_model(run.text_encoder) if config.train_text_encoder else None
        save_lora(path, unet, text_encoder)
    return Event("checkpoint", step=global_step, total_steps=run.max_train_steps, epoch=epoch, paths=[str(path)])


def _resume(run: Run) -> tuple[int, int]:
    """Load the checkpoint to resume from, if any; returns (global_step, first_epoch)."""
    config = run.config
    if not config.resume_from_checkpoint:
        return 0, 0
    path = checkpoints.resolve_checkpoint(config.output_dir, config.resume_from_checkpoint)
    if path is None:
        logger.info("no checkpoint in %s yet; starting a new run", config.output_dir)
        return 0, 0
    run.accelerator.load_state(str(path))
    state, rng_before = checkpoints.read_state(path)
    run.sampler.resume_point = checkpoints.resume_point(state, rng_before)
    return state.global_step, state.epoch


# --------------------------------------------------------------------------------------------
# Validation


def _validate(run: Run, prefix: str, step: int, emit: EventSink) -> list[str]:
    """Render the validation prompt with the LoRA as it stands; the training RNG is not touched."""
    config, accelerator = run.config, run.accelerator
    if not (config.validation_prompt and accelerator.is_main_process):
        return []
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        pipeline = validation.pipeline_with(
            config.pretrained_model_name_or_path, config.revision, config.variant, run.weight_dtype,
            accelerator.device, unet=accelerator.unwrap_model(run.unet),
            text_encoder=accelerator.unwrap_model(run.text_encoder), vae=run.components.vae,
            tokenizer=run.components.tokenizer,
        )
        started = time.perf_counter()
        rendered = validation.render(
            pipeline, config.validation_prompt, config.num_validation_images, config.seed,
            config.resolution, config.validation_inference_steps, _autocast_dtype(run),
        )
    paths = validation.save_images(rendered, Path(config.output_dir) / "validation", prefix)
    emit(Event("validation", step=step, total_steps=run.max_train_steps, paths=paths,
               message=f"{len(paths)} images in {time.perf_counter() - started:.1f}s"))
    return paths


def _final_validation(run: Run, lora_dir: Path, step: int, emit: EventSink) -> list[str]:
    """Render with the base model plus the saved LoRA file, proving the file loads."""
    config = run.config
    with torch.random.fork_rng(devices=[run.accelerator.device] if run.accelerator.device.type == "cuda" else []):
        pipeline = validation.pipeline_with(
            config.pretrained_model_name_or_path, config.revision, config.variant, run.weight_dtype,
            run.accelerator.device,
        )
        pipeline.load_lora_weights(str(lora_dir))
        rendered = validation.render(
            pipeline, config.validation_prompt, config.num_validation_images, config.seed,
            config.resolution, config.validation_inference_steps, _autocast_dtype(run),
        )
    paths = validation.save_images(rendered, Path(config.output_dir) / "validation", f"final-step-{step:06d}")
    emit(Event("validation", step=step, total_steps=run.max_train_steps, paths=paths, message="final, from the saved LoRA"))
    return paths


def _autocast_dtype(run: Run) -> torch.dtype | None:
    return None if run.config.mixed_precision == "no" else run.weight_dtype
