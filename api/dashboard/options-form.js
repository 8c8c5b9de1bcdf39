// The training options form, built from the trainer's own schema (/dashboard/options.json):
// one input per option, grouped, each with its default and a place for the server's message.

import {h} from './dom.js';

const GROUPS = [
  ['Training', ['max_train_steps', 'num_train_epochs', 'train_batch_size', 'gradient_accumulation_steps',
    'learning_rate', 'scale_lr', 'lr_scheduler', 'lr_warmup_steps', 'snr_gamma', 'noise_offset', 'max_grad_norm',
    'gradient_checkpointing']],
  ['LoRA', ['rank', 'lora_alpha', 'use_dora', 'train_text_encoder', 'text_encoder_lr']],
  ['Data', ['resolution', 'center_crop', 'random_flip', 'image_interpolation_mode', 'max_train_samples',
    'missing_captions', 'image_column', 'caption_column', 'dataloader_num_workers']],
  ['Checkpoints and validation', ['checkpointing_steps', 'checkpoints_total_limit', 'validation_prompt',
    'num_validation_images', 'validation_steps', 'validation_epochs', 'validation_inference_steps']],
  ['Optimizer', ['adam_beta1', 'adam_beta2', 'adam_weight_decay', 'adam_epsilon', 'adam_weight_decay_text_encoder']],
  ['Model and hardware', ['seed', 'mixed_precision', 'allow_tf32', 'cache_latents', 'prediction_type',
    'pretrained_vae_model_name_or_path', 'revision', 'variant']],
];

const HELP = {
  max_train_steps: 'total optimizer steps; empty: num_train_epochs decides',
  resolution: 'images are resized and cropped to this square size (a multiple of 8)',
  rank: 'LoRA rank: larger learns more detail and makes a bigger file',
  lora_alpha: 'scale of the LoRA update; empty: the rank',
  learning_rate: 'for the LoRA weights',
  text_encoder_lr: 'Flux/SD3 with train_text_encoder: the CLIP encoders’ rate (T5 stays frozen)',
  lr_warmup_steps: 'steps of linear warm-up at the start',
  snr_gamma: 'Min-SNR weighting; 5 is the paper’s choice; empty: off',
  checkpointing_steps: 'save a resumable checkpoint (and a usable LoRA) every this many steps',
  validation_prompt: 'render images with this prompt while training; empty: none',
  validation_steps: 'render every this many steps; empty: every validation_epochs',
  missing_captions: 'what to do with images that have no caption',
  cache_latents: 'encode images once (on by default when crops are fixed)',
  seed: 'the same seed, data and options give the same run',
  pretrained_vae_model_name_or_path: 'a separate VAE (a hub id in the server’s cache), e.g. the fp16-fix one',
};

/** The square size presets train at: the family's own default resolution (its native size, e.g.
 * SDXL's 1024, SD's 512), or 32 for the tiny demo models. */
function fullSize(model, defaults) {
  return model.startsWith('tiny-') ? 32 : defaults.resolution ?? 512;
}

// What the portrait, style and object presets share: the family's full size, an effective batch
// of 4, Min-SNR, four validation images. A preset's values(model, defaults) take the model's name
// and its family's option defaults.
const fullRun = (model, defaults) => ({resolution: fullSize(model, defaults), train_batch_size: 1,
  gradient_accumulation_steps: 4, learning_rate: 1e-4, snr_gamma: 5, num_validation_images: 4,
  validation_inference_steps: 30});

export const PRESETS = [
  {id: 'quick', label: 'Quick test', note: 'a few steps at low resolution: checks data and model end to end',
    values: (model, defaults) => ({resolution: model.startsWith('tiny-') ? 32 : fullSize(model, defaults) / 2,
      train_batch_size: 1, max_train_steps: 50,
      lr_warmup_steps: 0, checkpointing_steps: 25, validation_prompt: 'a photo', validation_steps: 25,
      num_validation_images: 1, validation_inference_steps: 10, rank: 4})},
  {id: 'portrait', label: 'Portrait', note: 'a face or person: center crops, flips, gentle learning rate',
    values: (model, defaults) => ({...fullRun(model, defaults), max_train_steps: 1500, lr_scheduler: 'cosine', lr_warmup_steps: 100, rank: 16,
      center_crop: true, random_flip: true, checkpointing_steps: 250,
      validation_prompt: 'a portrait photo of sks person', validation_steps: 250})},
  {id: 'style', label: 'Style', note: 'an art style: more rank and steps, random crops',
    values: (model, defaults) => ({...fullRun(model, defaults), max_train_steps: 3000, lr_scheduler: 'cosine', lr_warmup_steps: 200, rank: 32,
      center_crop: false, random_flip: true, checkpointing_steps: 500,
      validation_prompt: 'a city street, sks style', validation_steps: 500})},
  {id: 'object', label: 'Object', note: 'a thing or product: center crops, no flips',
    values: (model, defaults) => ({...fullRun(model, defaults), max_train_steps: 1000, lr_scheduler: 'constant_with_warmup', lr_warmup_steps: 100,
      rank: 8, center_crop: true, random_flip: false, checkpointing_steps: 250,
      validation_prompt: 'a photo of sks object on a table', validation_steps: 250})},
];

/** What kind of input an option's JSON schema asks for. */
function kindOf(spec) {
  const variants = spec.anyOf ?? [spec];
  const nullable = variants.some((v) => v.type === 'null');
  const main = variants.find((v) => v.type !== 'null') ?? {};
  if (main.enum) return {kind: 'enum', nullable, choices: main.enum};
  const kinds = {boolean: 'bool', integer: 'int', number: 'number'};
  return {kind: kinds[main.type] ?? 'text', nullable};
}

function label(name) {
  return name.replaceAll('_', ' ');
}

/** One field: label, input, default and an error slot; .get() is the value to send or undefined. */
function field(name, spec) {
  const {kind, nullable, choices} = kindOf(spec);
  const fallback = spec.default;
  const id = `opt-${name}`;
  const describedBy = `err-${name} hint-${name}`;
  let input;
  if (kind === 'enum' || (kind === 'bool' && nullable)) {
    const values = kind === 'enum' ? choices : [true, false];
    input = h('select', {id, name, 'aria-describedby': describedBy},
      h('option', {value: '', text: `default (${fallback ?? 'none'})`}),
      values.map((value) => h('option', {value: String(value), text: String(value)})));
  } else if (kind === 'bool') {
    input = h('input', {id, name, type: 'checkbox', checked: Boolean(fallback), 'aria-describedby': describedBy});
  } else {
    const numeric = kind === 'int' || kind === 'number';
    input = h('input', {id, name, type: numeric ? 'number' : 'text', step: numeric ? 'any' : null,
      inputmode: kind === 'int' ? 'numeric' : kind === 'number' ? 'decimal' : null, autocomplete: 'off',
      placeholder: fallback === null || fallback === undefined ? '' : String(fallback), 'aria-describedby': describedBy});
  }
  const error = h('p', {class: 'field-error', id: `err-${name}`});
  const hint = h('p', {class: 'hint', id: `hint-${name}`},
    HELP[name] ? `${HELP[name]}. ` : '', `Default: ${fallback === null || fallback === undefined ? 'none' : String(fallback)}`);
  const wrapper = h('div', {class: `field${kind === 'bool' && !nullable ? ' field-check' : ''}`, dataset: {option: name}},
    h('label', {for: id, class: 'mono', text: label(name)}), input, hint, error);

  wrapper.get = () => {
    if (input.type === 'checkbox') return input.checked === Boolean(fallback) ? undefined : input.checked;
    const raw = input.value.trim();
    if (raw === '') return undefined;
    if (kind === 'bool') return raw === 'true';
    if (kind === 'int' || kind === 'number') return Number.isNaN(Number(raw)) ? raw : Number(raw);
    return raw;
  };
  wrapper.set = (value) => {
    if (input.type === 'checkbox') input.checked = value === undefined ? Boolean(fallback) : Boolean(value);
    else input.value = value === undefined || value === null ? '' : String(value);
  };
  wrapper.showError = (message) => {
    error.textContent = message || '';
    if (message) input.setAttribute('aria-invalid', 'true');
    else input.removeAttribute('aria-invalid');
  };
  wrapper.input = input;
  return wrapper;
}

/**
 * The options panel of one model family (the schema of /dashboard/options.json?family=...):
 * {family, description, defaults, element, fields: Map(name -> field), values(), apply(values), clearErrors()}
 */
export function optionsForm(schema) {
  const fields = new Map(Object.entries(schema.properties).map(([name, spec]) => [name, field(name, spec)]));
  const placed = new Set();
  const groups = [...GROUPS, ['Other', [...fields.keys()]]].map(([title, names]) => {
    const members = names.filter((name) => fields.has(name) && !placed.has(name));
    members.forEach((name) => placed.add(name));
    if (!members.length) return null;
    return h('fieldset', {class: 'option-group'}, h('legend', {text: title}), members.map((name) => fields.get(name)));
  });
  const element = h('div', {class: 'options', dataset: {family: schema.family ?? 'sd'}}, groups);
  return {
    family: schema.family ?? 'sd',
    description: schema.description ?? '',
    defaults: Object.fromEntries(Object.entries(schema.properties).map(([name, spec]) => [name, spec.default])),
    element,
    fields,
    values() {
      const out = {};
      for (const [name, item] of fields) {
        const value = item.get();
        if (value !== undefined) out[name] = value;
      }
      return out;
    },
    apply(values) {
      for (const [name, item] of fields) item.set(values[name]);
    },
    clearErrors() {
      for (const item of fields.values()) item.showError('');
    },
  };
}

/**
 * The server's message split by the field it names: "resolution: must be ...; rank: ..." ->
 * {fields: Map(name -> text), rest: [text]}. `options.` and `body.` prefixes are dropped; a part
 * that names no field belongs to the field before it (messages may hold "; " themselves).
 */
export function splitMessage(message, isField) {
  const fields = new Map();
  const rest = [];
  let current = null;
  for (const part of String(message).split('; ')) {
    const match = /^([A-Za-z_][\w.]*): ([\s\S]*)$/.exec(part);
    const name = match?.[1].replace(/^body\./, '').replace(/^options\./, '');
    if (match && isField(name)) {
      fields.set(name, fields.has(name) ? `${fields.get(name)}; ${match[2]}` : match[2]);
      current = name;
    } else if (current && !match) {
      fields.set(current, `${fields.get(current)}; ${part}`);
    } else {
      rest.push(part);
      current = null;
    }
  }
  return {fields, rest};
}
