"""`train(config, on_event)`: the LoRA loop of diffusers' `train_text_to_image_lora.py` and
`train_text_to_image_lora_sdxl.py`, one loop for every model family.

Setup follows the scripts' order, because every random draw must land where the scripts' do
(LoRA init, data order, then per step the VAE latent sample, noise, timesteps): a user moving
from a script gets its loss curve. Everything that differs between families (components, image
transform, text conditioning, the UNet call, LoRA files, validation pipeline) is asked of
`run.family` (trainer/families/). Where this loop differs from the scripts, it says why.
"""

from __future__ import annotations

import logging
import math
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration, set_seed
from diffusers.training_utils import cast_training_params

from trainer import captions, checkpoints, control, data, latent_cache, optimizers, validation, validation_loss
from trainer.config import CommonConfig, ConfigError
from trainer.ema import EMA_WEIGHTS_NAME, LoraEMA
from trainer.detect import ModelNotFound, UnsupportedModel, detect_family
from trainer.events import Event, EventSink, Throughput, ignore_events
from trainer.families import Components, Conditioning, Family, get_family
from trainer.model import (
    KOHYA_WEIGHTS_NAME, WEIGHT_DTYPES, ModelLoadError, load_adapter_state, save_adapter_state,
)

logger = logging.getLogger("trainer")


@dataclass
class Run:
    """Everything a training run holds once set up."""

    config: CommonConfig
    family: Family
    accelerator: Accelerator
    # The family's components as training uses them: trainable models are the prepared ones.
    components: Components
    weight_dtype: torch.dtype
    # The models with LoRA by component name ("unet" first), as prepared by accelerate.
    models: dict[str, torch.nn.Module]
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
    # The memory layout of the VAE's output here; sampling follows it (see draw_inputs).
    latent_memory_format: torch.memory_format = torch.contiguous_format
    cache: latent_cache.CachePlan | None = None  # the latent cache, when on
    # The family's training objective: noise and timesteps, noisy input, target, loss.
    objective: object = None
    ema: LoraEMA | None = None  # the LoRA weights' moving average, when use_ema
    # The held-out loss (validation_split / validation_data_dir), when on.
    validator: validation_loss.ValidationLoss | None = None

    @property
    def trainable(self) -> tuple[torch.nn.Module, ...]:
        return tuple(self.models.values())

    @property
    def unet(self) -> torch.nn.Module:
        return self.components.unet

    @property
    def text_encoder(self) -> torch.nn.Module:
        """The (first) text encoder: with LoRA and prepared when it is trained."""
        return self.components.text_encoder

    def unwrapped(self, models: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
        return {name: self.accelerator.unwrap_model(model) for name, model in models.items()}


@dataclass
class TrainResult:
    """What a finished run produced."""

    lora_path: Path
    global_step: int
    losses: list[float]
    validation_images: list[str]
    # The held-out loss by step, and the kept checkpoint with the lowest one (validation loss on).
    validation_losses: dict[int, float] = dataclasses.field(default_factory=dict)
    best_checkpoint: Path | None = None


def train(config: CommonConfig, on_event: EventSink = ignore_events) -> TrainResult:
    """Train a LoRA as configured, reporting progress to `on_event`; raises on failure after
    reporting an `error` event."""
    try:
        return _train(config, on_event)
    except Exception as error:
        # Config, data and model errors already say what is wrong and where.
        message = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
        on_event(Event("error", message=message))
        raise


def setup(config: CommonConfig, data_folder: Path | None = None) -> Run:
    """Build the accelerator, models with LoRA, optimizer, data and schedule, in the scripts' order.

    `data_folder` is where the images are (a zip's extraction); by default `train_data_dir`.
    """
    family = get_family(config.family)
    check_family(config)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but no CUDA device is available")
    if not torch.distributed.is_initialized():
        # accelerate keeps one process-wide state; several runs in one process (tests, notebooks)
        # may each choose their own precision, and a rank forked from a process that trained
        # before must not inherit that run's single-process state (it would train as rank 0 of 1).
        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        cpu=config.device == "cpu",
        project_config=ProjectConfiguration(project_dir=config.output_dir),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=family.ddp_find_unused_parameters)],
    )
    if config.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        raise ConfigError("mixed_precision: fp16 needs a CUDA device; use bf16 or no here")
    if config.seed is not None:
        set_seed(config.seed)
    if accelerator.is_main_process:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)

    components = family.load(config)
    weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
    family.place(components, config, accelerator.device, weight_dtype)

    # LoRA init draws the first random numbers of the run.
    trainable = family.add_adapters(components, config)
    if config.mixed_precision != "no":
        cast_training_params(list(trainable.values()), dtype=torch.float32)
    # A list, not the SD script's `filter(...)`: that iterator is exhausted by the optimizer, so
    # its later clip_grad_norm_ clips nothing (the SDXL script builds a list, as here).
    lora_parameters = [p for model in trainable.values() for p in model.parameters() if p.requires_grad]
    if config.gradient_checkpointing:
        family.enable_gradient_checkpointing(trainable)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    learning_rate = config.learning_rate
    if config.scale_lr:
        learning_rate *= config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
    optimizer = optimizers.build_optimizer(config, family.parameter_groups(config, trainable, learning_rate),
                                           learning_rate, accelerator.device)

    dataset, cached, num_examples = _build_dataset(
        config, family, data_folder or Path(config.train_data_dir), components, accelerator.device
    )
    sampler = data.make_batch_sampler(dataset, config.train_batch_size, accelerator.num_processes)
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
    lr_scheduler = optimizers.build_scheduler(
        config, optimizer, config.lr_warmup_steps * accelerator.num_processes, scheduler_steps,
    )
    prepared = accelerator.prepare(*trainable.values(), optimizer, dataloader, lr_scheduler)
    models = dict(zip(trainable, prepared[: len(trainable)]))
    optimizer, dataloader, lr_scheduler = prepared[len(trainable):]
    steps_per_epoch = math.ceil(len(dataloader) / config.gradient_accumulation_steps)
    max_train_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    _register_checkpoint_hooks(accelerator, list(models))

    return Run(
        config=config, family=family, accelerator=accelerator, weight_dtype=weight_dtype,
        components=family.prepared(components, models), models=models,
        lora_parameters=lora_parameters, optimizer=optimizer, lr_scheduler=lr_scheduler,
        dataloader=dataloader, sampler=sampler, num_examples=num_examples, cached=cached,
        max_train_steps=max_train_steps, num_train_epochs=math.ceil(max_train_steps / steps_per_epoch),
        num_update_steps_per_epoch=steps_per_epoch,
        latent_memory_format=getattr(dataset, "memory_format", torch.contiguous_format),
        cache=getattr(dataset, "plan", None), objective=family.objective(components, config),
        ema=LoraEMA(lora_parameters, config.ema_decay) if config.use_ema else None,
        validator=_validator(config, family, data_folder or Path(config.train_data_dir), components),
    )


def _validator(config: CommonConfig, family: Family, folder: Path, components: Components):
    held_out = captions.apply_fixed(captions.CaptionPolicy.from_config(config),
                                    validation_loss.held_out_examples(config, family, folder))
    if (config.validation_split or config.validation_data_dir) and not held_out:
        raise ConfigError(f"validation_data_dir: no images in {config.validation_data_dir}")
    return validation_loss.ValidationLoss(config, family, components, held_out) if held_out else None


def check_family(config: CommonConfig) -> None:
    """The base model must be of the config's family; anything else is named, not crashed on."""
    source = config.pretrained_model_name_or_path
    try:
        detected = detect_family(source)
    except ModelNotFound as error:
        raise ModelLoadError(f"pretrained_model_name_or_path: cannot load {source!r}: {error}") from None
    except UnsupportedModel as error:
        raise ModelLoadError(f"pretrained_model_name_or_path: {error}") from None
    if detected != config.family:
        raise ConfigError(f"pretrained_model_name_or_path: {source} is a {detected} model, but the options "
                          f"are for the {config.family} family (set family: {detected})")


def draw_inputs(run: Run, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Conditioning]:
    """Encode, noise: latents, noise, timesteps and the UNet's conditioning for one batch (the
    random part)."""
    components, config, family = run.components, run.config, run.family
    if run.cache is not None:  # latent cache: its rows as stored, the others encoded now and kept
        # The posterior is sampled over the whole batch exactly where the uncached loop's
        # `latent_dist.sample()` draws. randn_like(latents) below fills in memory order, so the
        # parameters take the layout the VAE gives them (channels-last on some CPUs), or the
        # noise would differ. The cached text conditioning goes into the batch.
        params = _cached_inputs(run, batch)
    else:
        params = family.encode_image_params(components, batch["pixel_values"])
    latents = family.sample_latents(components, params, run.weight_dtype)
    noise, timesteps = run.objective.draw(latents)
    return latents, noise, timesteps, family.conditioning(components, batch, config, run.weight_dtype)


def optimize(run: Run, latents, noise, timesteps, conditioning: Conditioning) -> tuple[float, float | None]:
    """Predict, loss, backward, clip, step. Returns the loss gathered across processes and the
    gradient norm before clipping (None on accumulation steps that do not sync)."""
    objective = run.objective
    noisy_latents = objective.noisy_input(latents, noise, timesteps)
    target = objective.target(latents, noise, timesteps)
    model_pred = objective.prediction(run.family.predict(run.unet, noisy_latents, timesteps, conditioning),
                                      noisy_latents, timesteps)
    loss = objective.loss(model_pred, target, timesteps)

    # Every process's mean loss, for logging (one process: no collective to go through), weighted
    # by its rows. Each process sends a fixed-size [loss x rows, rows]: with aspect-ratio buckets
    # the processes' batches may differ in size, and a gather needs the same size everywhere.
    rows = latents.shape[0]
    if run.accelerator.num_processes > 1:
        totals = run.accelerator.gather(torch.stack([loss.detach().float() * rows, loss.new_tensor(rows).float()]))
        avg_loss = totals.view(-1, 2)[:, 0].sum() / totals.view(-1, 2)[:, 1].sum()
    else:
        avg_loss = loss.detach().repeat(rows).mean()
    run.accelerator.backward(loss)
    grad_norm = None
    if run.accelerator.sync_gradients:
        grad_norm = _clip_grad_norm(run)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad()
    # The step's one wait for the device: loss and norm come back in a single copy, after the
    # whole step is queued (each .item() on CUDA is a synchronisation).
    if not isinstance(grad_norm, torch.Tensor):
        return avg_loss.item(), None if grad_norm is None else float(grad_norm)
    loss_value, norm_value = torch.stack([avg_loss.float(), grad_norm.detach().float().to(avg_loss.device)]).tolist()
    return loss_value, norm_value


def _clip_grad_norm(run: Run):
    """accelerate's clip_grad_norm_, which on one plain process without a grad scaler is torch's
    call (the same numbers) behind a Python pass over every parameter looking for DTensors: a
    few percent of a small model's step."""
    accelerator = run.accelerator
    if accelerator.distributed_type == DistributedType.NO and accelerator.scaler is None:
        return torch.nn.utils.clip_grad_norm_(run.lora_parameters, run.config.max_grad_norm)
    return accelerator.clip_grad_norm_(run.lora_parameters, run.config.max_grad_norm)


def _train(config: CommonConfig, on_event: EventSink) -> TrainResult:
    with data.dataset_folder(config.train_data_dir) as folder:
        run = setup(config, folder)
        clean = False
        try:
            result = _train_in(run, on_event)
            clean = True
            return result
        finally:
            captions.activate(None)  # the next dataset built in this process reads captions as they are
            if run.cache is not None:  # a run that failed publishes nothing after its last checkpoint
                run.cache.cache.close(publish=clean)


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
              "num_train_epochs": run.num_train_epochs, "device": str(accelerator.device),
              **_text_cache_note(run),
              # With enable_bucket: [{width, height, images}] per aspect-ratio bucket.
              **({"buckets": run.sampler.plan} if isinstance(run.sampler, data.BucketBatchSampler) else {})},
    ))
    _prepare_cache(run, emit)  # after `start`, which says what the run is; before the first step
    # Save-now / sample-now requests arrive as files in the output folder; rank 0 reads them.
    control.watch_requests(config.output_dir if accelerator.is_main_process else None)
    _release_text_encoders(run)
    throughput = Throughput(total_batch, run.max_train_steps, global_step)
    losses: list[float] = []
    validation_losses: dict[int, float] = {}
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
                if run.ema is not None:
                    run.ema.update()
                losses.append(train_loss)
                images_per_s, eta_s = throughput.measure(global_step)
                emit(Event("step", step=global_step, total_steps=run.max_train_steps, epoch=epoch,
                           loss=train_loss, lr=run.lr_scheduler.get_last_lr()[0], grad_norm=grad_norm,
                           images_per_s=images_per_s, eta_s=eta_s))
                train_loss = 0.0
                stopping = control.stop_requested()  # read once: asked to hand over (trainer/control.py)
                requested = control.take_requests()  # save now / sample now (trainer/control.py)
                scheduled = global_step % config.checkpointing_steps == 0 or stopping
                if run.validator is not None and (
                        scheduled or "checkpoint" in requested or global_step >= run.max_train_steps
                        or global_step % (config.validation_loss_steps or config.checkpointing_steps) == 0):
                    held_out_loss = run.validator.measure(run)
                    validation_losses[global_step] = held_out_loss
                    emit(Event("validation_loss", step=global_step, total_steps=run.max_train_steps, epoch=epoch,
                               validation_loss=held_out_loss))
                if scheduled or "checkpoint" in requested:
                    batches_done = start_position + (step + 1) * accelerator.num_processes
                    event = _save_checkpoint(run, global_step, epoch, batches_done)
                    if not scheduled:
                        event.data, event.message = {"requested": True}, "saved on request"
                    emit(event)
                if stopping:
                    raise control.StopRequested(global_step)
                if config.validation_steps and global_step % config.validation_steps == 0:
                    images += _validate(run, f"step-{global_step:06d}", global_step, emit)
                elif "sample" in requested:  # a scheduled one at this step already serves it
                    images += _validate(run, f"now-step-{global_step:06d}", global_step, emit)
            if global_step >= run.max_train_steps:
                break

        if config.validation_prompt and not config.validation_steps and epoch % config.validation_epochs == 0:
            images += _validate(run, f"epoch-{epoch:04d}-step-{global_step:06d}", global_step, emit)

    accelerator.wait_for_everyone()
    lora_path = Path(config.output_dir) / "pytorch_lora_weights.safetensors"
    if accelerator.is_main_process:
        models = run.unwrapped(run.models)
        lora_path = run.family.save_lora(config.output_dir, models)
        if run.ema is not None:
            run.ema.save_lora(Path(config.output_dir), lambda folder: run.family.save_lora(folder, models))
        run.family.save_kohya_lora(config.output_dir, config.effective_lora_alpha, models)
        (Path(config.output_dir) / "training_config.json").write_text(config.model_dump_json(indent=2))
        if config.validation_prompt:
            images += _final_validation(run, lora_path.parent, global_step, emit)
    accelerator.end_training()
    emit(Event("done", step=global_step, total_steps=run.max_train_steps, loss=losses[-1] if losses else None,
               paths=[str(lora_path), str(Path(config.output_dir) / KOHYA_WEIGHTS_NAME),
                      *([str(Path(config.output_dir) / EMA_WEIGHTS_NAME)] if run.ema is not None else [])],
               message=f"saved {lora_path}",
               data=_best_checkpoint_data(config, validation_losses) if run.validator is not None else None))
    best = (_best_checkpoint_data(config, validation_losses) or {}).get("best_checkpoint")
    return TrainResult(lora_path=lora_path, global_step=global_step, losses=losses, validation_images=images,
                       validation_losses=validation_losses,
                       best_checkpoint=Path(config.output_dir) / best if best else None)


def _best_checkpoint_data(config: CommonConfig, values: dict[int, float]) -> dict | None:
    """The kept checkpoint with the lowest validation loss measured in this run."""
    steps = [int(path.name.split("-")[1]) for path in checkpoints.complete_checkpoints(config.output_dir)]
    best = validation_loss.best_checkpoint(values, steps)
    if best is None:
        return None
    return {"best_checkpoint": f"checkpoint-{best}", "best_validation_loss": values[best]}


# --------------------------------------------------------------------------------------------
# Data and the latent cache


def _build_dataset(config: CommonConfig, family: Family, folder: Path, components: Components, device):
    """The dataset to train on, and whether it serves cached latents instead of pixels."""
    transform = family.image_transform(config)
    examples = data.scan_examples(folder, config.caption_column, config.missing_captions)
    examples = data.select_samples(examples, config.max_train_samples, config.seed)
    examples = family.captions(config, examples)
    examples = validation_loss.split(config, examples)[0]  # the held-out share never trains
    policy = captions.CaptionPolicy.from_config(config)
    captions.activate(policy)  # shuffled tags / dropout drawn at every read (data.draw_caption)
    examples = captions.apply_fixed(policy, examples)
    if getattr(transform, "buckets", None) is not None:
        data.bucket_sizes(examples, transform)  # an image no bucket takes fails here, by name
    if _use_cache(config, examples, transform):
        return _cached_dataset(config, family, folder, examples, transform, components, device), True, len(examples)
    return family.dataset(config, examples, components), False, len(examples)


def _text_cache_note(run: Run) -> dict:
    """Whether text embeddings are cached and, when captions vary, why not."""
    why = captions.CaptionPolicy.from_config(run.config).why_varies
    cached = run.cache is not None and run.cache.text_keys is not None
    return {"text_cache": cached, **({"text_cache_off_because": why} if why and run.cache is not None else {})}


def _use_cache(config: CommonConfig, examples: list[data.Example], transform: data.ImageTransform) -> bool:
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


def _cached_dataset(config, family: Family, folder: Path, examples, transform, components: Components, device):
    """The caching dataset: entries encoded as the loop first needs them (or up front when that
    pays, see latent_cache.choose_upfront), in a cache keyed by what they depend on."""
    ram_bytes = config.cache_ram_mb * 2**20
    if config.cache_dir:
        vae_source = getattr(config, "pretrained_vae_model_name_or_path", None)
        key = latent_cache.cache_key({
            "family": family.name,
            "model": latent_cache.model_identity(config.pretrained_model_name_or_path, config.revision, config.variant),
            "vae": latent_cache.model_identity(vae_source) if vae_source else None,
            "resolution": config.resolution, "center_crop": config.center_crop,
            "interpolation": config.image_interpolation_mode, "dtype": str(WEIGHT_DTYPES[config.mixed_precision]),
            "device": torch.device(device).type,
            # Bucket settings decide each image's resize and crop (absent without buckets: the
            # keys of square-crop caches stay what they were).
            **({"buckets": transform.buckets.describe()} if getattr(transform, "buckets", None) else {}),
        })
        cache = latent_cache.LatentCache(ram_bytes, root=Path(config.cache_dir), key=key,
                                         max_bytes=config.cache_max_bytes)
    else:
        cache = latent_cache.LatentCache(ram_bytes, spill_dir=Path(config.output_dir))
    image_keys = latent_cache.image_keys(folder, [e.path for e in examples], config.train_data_dir)
    # With buckets each bucket's latents are a kind of their own (their shape differs).
    kinds = ([latent_cache.latent_kind(transform.crop_size(e.size)) for e in examples]
             if getattr(transform, "buckets", None) else [latent_cache.LATENT] * len(examples))
    # Text conditioning is cached unless it trains or the captions vary from step to step.
    text_keys = (None if config.train_text_encoder or captions.CaptionPolicy.from_config(config).varies
                 else [latent_cache.text_key(e.caption) for e in examples])
    orientations = 2 if config.random_flip else 1
    flips = (False, True)[:orientations]
    missing = sum(not cache.has(kind, latent_cache.latent_key(k, f))
                  for k, kind in zip(image_keys, kinds) for f in flips)
    missing += len({k for k in text_keys or () if not cache.has(latent_cache.TEXT, k)})
    total = len(image_keys) * orientations + len(set(text_keys or ()))
    steps = config.max_train_steps or config.num_train_epochs * math.ceil(len(examples) / config.train_batch_size)
    images_read = steps * config.train_batch_size * config.gradient_accumulation_steps
    upfront = config.cache_upfront
    if upfront is None:
        upfront = latent_cache.choose_upfront(len(examples), orientations, images_read, missing)
    dataset = data.CachingDataset(examples, transform, lambda captions: family.tokenize(components, captions),
                                  cache, image_keys, text_keys, kinds)
    dataset.plan = latent_cache.CachePlan(cache, image_keys, text_keys, orientations, bool(upfront and missing),
                                          missing, total, kinds)
    return dataset


def _cached_inputs(run: Run, batch: dict) -> torch.Tensor:
    """Complete a batch from the cache: returns the posterior parameters of every row (encoding
    and keeping those not cached yet) and puts the text conditioning into `batch`."""
    plan, components, family = run.cache, run.components, run.family
    token_keys = run.dataloader.dataset.token_keys if hasattr(run.dataloader, "dataset") else ("input_ids",)
    params = latent_cache.batch_latent_params(
        plan.cache, batch, plan.image_keys, lambda pixels: family.encode_image_params(components, pixels),
        run.accelerator.device, exclude=(*token_keys, *family.text_keys), kinds=plan.latent_kinds,
    )
    if plan.text_keys is not None:
        batch.update(latent_cache.batch_text(plan.cache, batch, plan.text_keys, token_keys, family.text_keys,
                                             lambda tokens: family.encode_text(components, tokens)))
    return params


def _prepare_cache(run: Run, emit: EventSink) -> None:
    """Report the cache's plan as a `prepare` event and, when chosen, run the up-front pass with
    progress (done/total, images/s, ETA)."""
    plan = run.cache
    if plan is None:
        return
    mode = "upfront" if plan.upfront else "as_you_go"
    if not plan.upfront:
        emit(Event("prepare", message=f"latent cache: {plan.total - plan.missing}/{plan.total} entries cached, "
                                      "the rest is encoded as the run first reads it",
                   data={"done": plan.total - plan.missing, "total": plan.total, "mode": mode}))
        return

    def report(done: int, total: int, rate: float | None, eta: float | None) -> None:
        emit(Event("prepare", images_per_s=rate, eta_s=eta, message=f"latent cache: encoding {done}/{total}",
                   data={"done": done, "total": total, "mode": mode}))

    dataset, family, components = run.dataloader.dataset, run.family, run.components
    latent_cache.prepare_upfront(
        plan.cache, dataset.examples, dataset.transform, plan.image_keys, plan.text_keys,
        lambda pixels: family.encode_image_params(components, pixels),
        lambda tokens: family.encode_text(components, tokens), dataset.tokenize_captions,
        run.config.train_batch_size, run.accelerator.device, latent_cache.Progress(report), plan.latent_kinds,
    )


def _release_text_encoders(run: Run) -> None:
    """With frozen text encoders and every caption's conditioning cached, families whose text
    encoders dwarf what trains (Flux's and SD3's T5) free them: the captions not cached yet are
    encoded now, then the family drops the encoders (validation reloads them)."""
    plan = run.cache
    if plan is None or plan.text_keys is None or run.validator is not None:  # validation loss encodes text
        return
    family, components = run.family, run.components
    if not family.release_text_encoders(components, dry_run=True):
        return
    dataset = run.dataloader.dataset
    pending: dict[str, int] = {}
    for index, key in enumerate(plan.text_keys):
        if key not in pending and not plan.cache.has(latent_cache.TEXT, key):
            pending[key] = index
    items = list(pending.items())
    with torch.no_grad():
        for start in range(0, len(items), run.config.train_batch_size):
            chunk = items[start:start + run.config.train_batch_size]
            tokens = dataset.tokenize_captions([dataset.examples[i].caption for _, i in chunk])
            encoded = family.encode_text(components, {k: v.to(run.accelerator.device) for k, v in tokens.items()})
            for row, (key, _) in enumerate(chunk):
                plan.cache.put(latent_cache.TEXT, key, {name: value[row] for name, value in encoded.items()})
    family.release_text_encoders(components)


# --------------------------------------------------------------------------------------------
# Checkpoints


def _register_checkpoint_hooks(accelerator: Accelerator, names: list[str]) -> None:
    """Checkpoints hold only the adapters, not a copy of the frozen base model."""

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
        if run.ema is not None:  # before the plain LoRA file, which marks the folder complete
            run.ema.save_state(path)
            run.ema.save_lora(path, lambda folder: run.family.save_lora(folder, run.unwrapped(run.models)))
        run.family.save_lora(path, run.unwrapped(run.models))
    if run.cache is not None:  # what this run encoded so far outlives a crash after this point
        run.cache.cache.publish()
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
    if run.ema is not None:
        run.ema.load_state(path)
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
        models = run.unwrapped(run.family.models(run.components))
        pipeline = run.family.pipeline(config, run.weight_dtype, accelerator.device, **models)
        started = time.perf_counter()
        rendered = validation.render(
            pipeline, config.validation_prompt, config.num_validation_images, config.seed,
            validation_size(run), config.validation_inference_steps, _autocast_dtype(run),
        )
    paths = validation.save_images(rendered, Path(config.output_dir) / "validation", prefix)
    emit(Event("validation", step=step, total_steps=run.max_train_steps, paths=paths,
               message=f"{len(paths)} images in {time.perf_counter() - started:.1f}s"))
    return paths


def _final_validation(run: Run, lora_dir: Path, step: int, emit: EventSink) -> list[str]:
    """Render with the base model plus the saved LoRA file, proving the file loads."""
    config = run.config
    with torch.random.fork_rng(devices=[run.accelerator.device] if run.accelerator.device.type == "cuda" else []):
        # A fresh base model plus the saved file; the VAE is the one trained with (the script
        # passes it too: a separate VAE, or SDXL's fp32 one).
        pipeline = run.family.pipeline(config, run.weight_dtype, run.accelerator.device, vae=run.components.vae)
        pipeline.load_lora_weights(str(lora_dir))
        rendered = validation.render(
            pipeline, config.validation_prompt, config.num_validation_images, config.seed,
            validation_size(run), config.validation_inference_steps, _autocast_dtype(run),
        )
    paths = validation.save_images(rendered, Path(config.output_dir) / "validation", f"final-step-{step:06d}")
    emit(Event("validation", step=step, total_steps=run.max_train_steps, paths=paths, message="final, from the saved LoRA"))
    return paths


def validation_size(run: Run) -> tuple[int, int]:
    """(height, width) of validation images: the square `resolution`, or with aspect-ratio
    buckets the bucket most images train in (the shape the LoRA learns most from)."""
    if isinstance(run.sampler, data.BucketBatchSampler) and run.sampler.plan:
        top = run.sampler.plan[0]
        return top["height"], top["width"]
    return run.config.resolution, run.config.resolution


def _autocast_dtype(run: Run) -> torch.dtype | None:
    return None if run.config.mixed_precision == "no" else run.weight_dtype
