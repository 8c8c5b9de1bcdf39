"""FLUX.1 (dev and schnell): the family of diffusers' `train_dreambooth_lora_flux.py`.

What differs from SD/SDXL, as the script does it:
- a `FluxTransformer2DModel` instead of a UNet, trained by flow matching
  (trainer/flow_matching.py) on the pipeline's `FlowMatchEulerDiscreteScheduler` grid;
- latents are `(sample - shift_factor) * scaling_factor` (16 channels), packed into 2x2 patches
  for the transformer with their image ids, and the prediction unpacked again;
- the text conditioning is CLIP's pooled output and T5's last hidden state, T5's tokens padded to
  `max_sequence_length`; text ids are zeros;
- the dev model (a guidance embedding) gets `guidance_scale` as a constant input every step,
  schnell none;
- LoRA on the attention and feed-forward projections of every block (`lora_layers` to choose);
- the image is resized (bilinear), maybe flipped, then cropped, as the script's dataset does.

The transformer is the loop's trainable "unet" (the denoiser's name in the loop); it is
"transformer" in the pipeline and the LoRA files. The text encoders are held in one dict the
loop's copies of the components share, so freeing them (`release_text_encoders`) frees them for
every holder.
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from trainer import data
from trainer.buckets import Buckets
from trainer.config import FluxConfig
from trainer.detect import is_single_file_name
from trainer.families.base import Components, Conditioning, Family, load_error, single_file_config_dir
from trainer.families.sdxl import SDXLDataset, SDXLImageTransform
from trainer.flow_matching import FlowMatchingObjective
from trainer.model import kohya_state_dict, lora_config, save_lora, write_kohya_file

# The script's default LoRA targets (attention and feed-forward of the double-stream blocks; the
# single-stream blocks' attention shares the names to_q/to_k/to_v).
FLUX_TARGET_MODULES = [
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]
TOKEN_KEYS = ("input_ids", "input_ids_2")  # CLIP's, T5's


@dataclass(frozen=True)
class FlowImageTransform(SDXLImageTransform):
    """The DreamBooth scripts' order (resize, flip drawn as SDXL's, crop), pixels only."""

    def __call__(self, image, flip: bool | None = None) -> dict[str, torch.Tensor]:
        return {"pixel_values": super().__call__(image, flip)["pixel_values"]}


@dataclass
class FlowComponents(Components):
    """Components with frozen text encoders in a shared dict (None once released)."""

    encoders: dict[str, torch.nn.Module | None] = field(default_factory=dict)
    tokenizers: dict[str, object] = field(default_factory=dict)
    max_sequence_length: int = 512

    @property
    def text_encoder(self):
        return self.encoders.get("text_encoder")

    @property
    def text_encoder_2(self):
        return self.encoders.get("text_encoder_2")

    @property
    def text_encoder_3(self):
        return self.encoders.get("text_encoder_3")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """A model's dtype, through accelerate's DDP wrapper (a trained text encoder under several
    processes), which has no `dtype` of its own."""
    return getattr(model, "module", model).dtype


class FlowFamily(Family):
    """What Flux and SD3 share: loading, flow matching, text-encoder release, files."""

    transformer_class: type
    # (component name, class) of each tokenizer and text encoder, in the pipeline's order.
    tokenizer_classes: tuple[tuple[str, type], ...]
    text_encoder_classes: tuple[tuple[str, type], ...]
    # The encoders train_text_encoder puts LoRA on (the CLIPs; T5 stays frozen in the scripts).
    trained_text_encoders: tuple[str, ...]
    target_modules: list[str]

    @property
    def text_encoder_names(self):
        return tuple(name for name, _ in self.text_encoder_classes)

    def load(self, config) -> FlowComponents:
        source = config.pretrained_model_name_or_path
        common = {"revision": config.revision}
        weights = {"variant": config.variant, **common}
        if is_single_file_name(source):
            # A finetune shared as one file (BFL's / Stability's layout) is its transformer: the
            # rest (VAE, text encoders, tokenizers, scheduler) comes from the family's diffusers
            # folder, as kohya's --clip_l/--t5xxl/--ae files come beside a Flux checkpoint.
            source, common, weights = single_file_config_dir(config), {}, {}
        try:
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", **common)
            tokenizers = {name: cls.from_pretrained(source, subfolder=name, **common)
                          for name, cls in self.tokenizer_classes}
            encoders = {name: cls.from_pretrained(source, subfolder=name, **weights)
                        for name, cls in self.text_encoder_classes}
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **weights)
            transformer = self.load_transformer(config)
        except (OSError, ValueError, EnvironmentError) as error:
            raise load_error(config, error) from None
        return FlowComponents(noise_scheduler=scheduler, vae=vae, unet=transformer, encoders=encoders,
                              tokenizers=tokenizers, max_sequence_length=config.max_sequence_length)

    def load_transformer(self, config, dtype: torch.dtype | None = None) -> torch.nn.Module:
        """The base transformer: from the pipeline folder, or converted from a single file by
        diffusers (its config from `pretrained_config_dir`, nothing downloaded)."""
        source = config.pretrained_model_name_or_path
        if is_single_file_name(source):
            return self.transformer_class.from_single_file(
                source, config=single_file_config_dir(config), subfolder="transformer", local_files_only=True,
                torch_dtype=dtype)
        return self.transformer_class.from_pretrained(source, subfolder="transformer", revision=config.revision,
                                                      variant=config.variant, torch_dtype=dtype)

    def load_pipeline(self, config, dtype: torch.dtype, **models):
        """For a single file: the config folder's pipeline around the file's transformer (loaded
        again when not given: the final image is the base + the LoRA file)."""
        if not is_single_file_name(config.pretrained_model_name_or_path):
            return super().load_pipeline(config, dtype, **models)
        models.setdefault("transformer", self.load_transformer(config, dtype))
        return self.pipeline_class.from_pretrained(single_file_config_dir(config), dtype=dtype, **models)

    def text_encoders(self, components: FlowComponents) -> dict[str, torch.nn.Module]:
        return {name: model for name, model in components.encoders.items() if model is not None}

    def models(self, components: FlowComponents) -> dict[str, torch.nn.Module]:
        # Released text encoders are left out: the validation pipeline loads them again.
        return {"transformer": components.unet, **self.text_encoders(components), "vae": components.vae}

    def add_adapters(self, components: FlowComponents, config) -> dict[str, torch.nn.Module]:
        """The transformer's adapter, then with train_text_encoder the CLIP encoders' (the
        scripts' order of LoRA init draws); T5 is never trained."""
        components.unet.add_adapter(lora_config(config, self.lora_targets(config)))
        trainable = {"unet": components.unet}
        if config.train_text_encoder:
            for name in self.trained_text_encoders:
                components.encoders[name].add_adapter(lora_config(config, self.text_encoder_target_modules))
                trainable[name] = components.encoders[name]
        return trainable

    def parameter_groups(self, config, trainable: dict[str, torch.nn.Module], learning_rate: float) -> list:
        """The scripts' groups: the transformer at learning_rate, each CLIP encoder at
        text_encoder_lr with its own weight decay (Prodigy: learning_rate, as the scripts)."""
        groups = []
        for name, model in trainable.items():
            group = {"params": [p for p in model.parameters() if p.requires_grad], "lr": learning_rate}
            if name != "unet":
                group["lr"] = config.text_encoder_rate(learning_rate)
                if config.optimizer != "adafactor":  # adam_weight_decay_* are the Adam-style optimizers'
                    group["weight_decay"] = config.adam_weight_decay_text_encoder
            groups.append(group)
        return groups

    def prepared(self, components: FlowComponents, models: dict[str, torch.nn.Module]) -> FlowComponents:
        # The text encoders live in the shared dict: every holder of the components (the
        # validation loss too) calls the prepared, trained ones.
        components.encoders.update({name: model for name, model in models.items() if name != "unet"})
        return dataclasses.replace(components, unet=models["unet"])

    def lora_targets(self, config) -> list[str]:
        return list(config.lora_layers) if config.lora_layers else list(self.target_modules)

    def objective(self, components: FlowComponents, config) -> FlowMatchingObjective:
        return FlowMatchingObjective(
            components.noise_scheduler, config.weighting_scheme, config.logit_mean, config.logit_std,
            config.mode_scale, precondition_outputs=getattr(config, "precondition_outputs", False))

    def captions(self, config, examples: list[data.Example]) -> list[data.Example]:
        if not config.instance_prompt:
            return examples
        return [e if e.caption else dataclasses.replace(e, caption=config.instance_prompt) for e in examples]

    def release_text_encoders(self, components: FlowComponents, dry_run: bool = False) -> bool:
        """Off the device and deleted: the shared dict drops them, so no holder keeps them."""
        if dry_run:
            return True
        for name, model in list(components.encoders.items()):
            if model is not None:
                model.to("cpu")
            components.encoders[name] = None
        model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return True

    # ---- data --------------------------------------------------------------------------------

    def image_transform(self, config) -> FlowImageTransform:
        return FlowImageTransform(config.resolution, config.center_crop, config.random_flip,
                                  config.image_interpolation_mode, Buckets.from_config(config))

    def dataset(self, config, examples: list[data.Example], components: FlowComponents):
        return SDXLDataset(examples, self.image_transform(config), lambda captions: self.tokenize(components, captions))

    def tokenize_one(self, tokenizer, captions: list[str], max_length: int) -> torch.Tensor:
        return tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt").input_ids

    # ---- a training step ---------------------------------------------------------------------

    def sample_latents(self, components: FlowComponents, params: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
        config = components.vae.config
        latents = DiagonalGaussianDistribution(params).sample()
        return ((latents - config.shift_factor) * config.scaling_factor).to(weight_dtype)

    # ---- files -------------------------------------------------------------------------------

    def save_lora(self, output_dir: str | Path, models: dict[str, torch.nn.Module]) -> Path:
        named = {"transformer": models["unet"], **{name: model for name, model in models.items() if name != "unet"}}
        return save_lora(output_dir, self.pipeline_class, named, peft_names=True)


# diffusers' Flux modules (the parts fused there, in order) -> the original BFL module that
# sd-scripts and ComfyUI name. Keys are relative to a (single_)transformer_blocks.{i}.
_DOUBLE_TO_BFL = {
    ("attn.to_q", "attn.to_k", "attn.to_v"): "img_attn.qkv",
    ("attn.to_out.0",): "img_attn.proj",
    ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "txt_attn.qkv",
    ("attn.to_add_out",): "txt_attn.proj",
    ("ff.net.0.proj",): "img_mlp.0",
    ("ff.net.2",): "img_mlp.2",
    ("ff_context.net.0.proj",): "txt_mlp.0",
    ("ff_context.net.2",): "txt_mlp.2",
    ("norm1.linear",): "img_mod.lin",
    ("norm1_context.linear",): "txt_mod.lin",
}
_SINGLE_TO_BFL = {
    ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"): "linear1",
    ("proj_out",): "linear2",
    ("norm.linear",): "modulation.lin",
}


def kohya_fused_state_dict(transformer: torch.nn.Module, lora_alpha: float,
                           modules: list[tuple[tuple[str, ...], str]],
                           swapped: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The transformer's adapters as sd-scripts names a transformer LoRA (`lora_unet_` + the
    original checkpoint's module path, dots as underscores), which ComfyUI maps onto that
    checkpoint's modules. `modules` lists (the diffusers modules fused there, in order; the
    original module).

    Where the original fuses several diffusers modules (q, k, v; Flux's single blocks' q, k, v and
    MLP in), the parts' LoRAs become one of rank n * r: down = the parts' A stacked, up = their B
    block-diagonal (a part without LoRA contributes zeros), alpha = n * alpha, so the scale alpha /
    rank and every part's update are unchanged. In `swapped` modules the original orders the two
    halves of the output the other way round (SD3's last context modulation): up's rows swap."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer)
    named = dict(transformer.named_modules())
    rank = next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))
    kohya: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for parts, original in modules:
        if not any(f"{name}.lora_A.weight" in state for name in parts):
            continue
        downs, ups = [], []
        for name in parts:
            linear = named[name].base_layer if hasattr(named[name], "base_layer") else named[name]
            down = state.get(f"{name}.lora_A.weight")
            up = state.get(f"{name}.lora_B.weight")
            downs.append(down if down is not None else torch.zeros(rank, linear.in_features))
            ups.append(up if up is not None else torch.zeros(linear.out_features, rank))
            used.update({f"{name}.lora_A.weight", f"{name}.lora_B.weight"})
        up = torch.block_diag(*ups)
        if original in swapped:
            first, second = up.chunk(2, dim=0)
            up = torch.cat([second, first], dim=0)
        key = f"lora_unet_{original.replace('.', '_')}"
        kohya[f"{key}.lora_down.weight"] = torch.cat(downs, dim=0)
        kohya[f"{key}.lora_up.weight"] = up
        kohya[f"{key}.alpha"] = torch.tensor(float(lora_alpha) * len(parts))
    left = sorted(set(state) - used)
    if left:  # a module chosen with lora_layers that has no place in the original naming
        raise ValueError(f"lora_layers: no kohya (ComfyUI) name for {left[0]}")
    return {k: v.detach().float().contiguous().cpu() for k, v in kohya.items()}


def kohya_flux_state_dict(transformer: torch.nn.Module, lora_alpha: float) -> dict[str, torch.Tensor]:
    """sd-scripts' Flux naming (`lora_unet_double_blocks_0_img_attn_qkv`, ...), which ComfyUI and
    Forge map onto the BFL checkpoint; diffusers' kohya-Flux loader splits it back (tested)."""
    modules = []
    for prefix, count, table, original in (
        ("transformer_blocks", len(transformer.transformer_blocks), _DOUBLE_TO_BFL, "double_blocks"),
        ("single_transformer_blocks", len(transformer.single_transformer_blocks), _SINGLE_TO_BFL, "single_blocks"),
    ):
        modules += [(tuple(f"{prefix}.{i}.{part}" for part in parts), f"{original}.{i}.{name}")
                    for i in range(count) for parts, name in table.items()]
    return kohya_fused_state_dict(transformer, lora_alpha, modules)


def save_flow_kohya_lora(output_dir, lora_alpha: float, models: dict[str, torch.nn.Module],
                         transformer_tensors: dict[str, torch.Tensor], network_module: str) -> Path:
    """`lora_kohya.safetensors`: the transformer's adapters under their original names and the
    trained CLIP encoders' as `lora_te1_`/`lora_te2_text_model_...` (sd-scripts' names)."""
    encoders = {name: model for name, model in models.items() if name != "unet"}
    tensors = {**transformer_tensors, **(kohya_state_dict(lora_alpha, encoders) if encoders else {})}
    return write_kohya_file(output_dir, tensors, lora_alpha, network_module)


class FluxFamily(FlowFamily):
    name = "flux"
    pipeline_class = FluxPipeline
    transformer_class = FluxTransformer2DModel
    tokenizer_classes = (("tokenizer", CLIPTokenizer), ("tokenizer_2", T5TokenizerFast))
    text_encoder_classes = (("text_encoder", CLIPTextModel), ("text_encoder_2", T5EncoderModel))
    trained_text_encoders = ("text_encoder",)
    text_keys = ("prompt_embeds", "pooled_prompt_embeds")
    target_modules = FLUX_TARGET_MODULES

    def tokenize(self, components: FlowComponents, captions: list[str]) -> dict[str, torch.Tensor]:
        return {TOKEN_KEYS[0]: self.tokenize_one(components.tokenizers["tokenizer"], captions, 77),
                TOKEN_KEYS[1]: self.tokenize_one(components.tokenizers["tokenizer_2"], captions,
                                                 components.max_sequence_length)}

    def encode_text(self, components: FlowComponents, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The script's `encode_prompt`: CLIP's pooled output, T5's last hidden state, both in
        the first encoder's dtype."""
        clip, t5 = components.text_encoder, components.text_encoder_2
        pooled = clip(batch[TOKEN_KEYS[0]], output_hidden_states=False).pooler_output
        prompt_embeds = t5(batch[TOKEN_KEYS[1]], output_hidden_states=False)[0]
        return {"prompt_embeds": prompt_embeds.to(dtype=model_dtype(t5)),
                "pooled_prompt_embeds": pooled.to(dtype=model_dtype(clip))}

    def conditioning(self, components: FlowComponents, batch, config: FluxConfig, weight_dtype) -> Conditioning:
        conditioning = Conditioning(self.text_conditioning(components, batch))
        transformer = getattr(components.unet, "module", components.unet)  # unwrapped from DDP
        if transformer.config.guidance_embeds:
            # The dev model's distilled guidance: one constant value per example (fp32, as the script).
            size = conditioning["prompt_embeds"].shape[0]
            device = conditioning["prompt_embeds"].device
            conditioning["guidance"] = torch.tensor([config.guidance_scale], device=device).expand(size)
        return conditioning

    def predict(self, transformer, noisy_latents, timesteps, conditioning: Conditioning) -> torch.Tensor:
        """Pack 2x2 patches with their image ids, call the transformer (timesteps / 1000, as the
        script), unpack. `_unpack_latents(x, h * f, w * f, f)` is the script's call for any VAE
        scale f; f = 1 spares the VAE here."""
        batch, channels, height, width = noisy_latents.shape
        packed = FluxPipeline._pack_latents(noisy_latents, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy_latents.device,
                                                           noisy_latents.dtype)
        prompt_embeds = conditioning["prompt_embeds"]
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=prompt_embeds.device, dtype=noisy_latents.dtype)
        pred = transformer(
            hidden_states=packed, timestep=timesteps / 1000, guidance=conditioning.get("guidance"),
            pooled_projections=conditioning["pooled_prompt_embeds"], encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids, img_ids=image_ids, return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(pred, height, width, 1)

    def save_kohya_lora(self, output_dir, lora_alpha: float, models: dict[str, torch.nn.Module]) -> Path:
        """The file ComfyUI and Forge load (sd-scripts' Flux naming, see kohya_flux_state_dict)."""
        return save_flow_kohya_lora(output_dir, lora_alpha, models, kohya_flux_state_dict(models["unet"], lora_alpha),
                                    "networks.lora_flux")
