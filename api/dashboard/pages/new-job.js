// New job: a dataset (chosen or uploaded), a base model from GET /v1/models, a preset, every
// training option of the model's family, and the server's messages shown next to the fields they
// name: checked as the user types (POST /v1/jobs/validate, the submit's own checks) and again on
// submit. Picking a model of another family rebuilds the options from that family's schema
// (/dashboard/options.json?family=...), keeping the values both families share.

import {ApiError, get, getAll, isAbort, post} from '../api.js';
import {h, replace} from '../dom.js';
import * as fmt from '../format.js';
import {PRESETS, optionsForm, splitMessage} from '../options-form.js';
import {errorNotice} from './common.js';
import {uploadBox} from './upload.js';

export async function newJobPage(main, ctx) {
  main.append(h('div', {class: 'page-head'}, h('h1', {text: 'New job'})));
  let schema;
  let models;
  let datasets;
  const schemas = familySchemas(ctx.signal);
  try {
    [models, datasets] = await Promise.all([get('/v1/models', {signal: ctx.signal}),
      getAll('/v1/datasets', {signal: ctx.signal})]);
    const first = models.find((m) => m.available) ?? models[0];
    schema = await schemas(first?.family ?? 'sd');
  } catch (error) {
    main.append(errorNotice(error) ?? '');
    return;
  }
  const form = jobForm(schema, schemas, models, datasets, ctx);
  main.append(form);
}

/** family -> its options schema, each fetched once per page. */
function familySchemas(signal) {
  const cache = new Map();
  return (family) => {
    if (!cache.has(family)) {
      cache.set(family, fetch(`/dashboard/options.json?family=${encodeURIComponent(family)}`, {signal})
        .then((r) => (r.ok ? r.json() : Promise.reject(new Error(`no options for the ${family} family (${r.status})`)))));
    }
    return cache.get(family);
  };
}

function modelLabel(m) {
  const family = m.family ? ` · ${m.family}` : '';
  return `${m.name}${family}${m.available ? '' : ' (cannot train here)'}`;
}

function jobForm(schema, schemas, models, datasets, ctx) {
  let options = optionsForm(schema);
  const general = h('div', {class: 'form-errors', role: 'alert'});
  const slot = (name) => h('p', {class: 'field-error', id: `err-${name}`});
  const errors = {dataset_id: slot('dataset_id'), base_model: slot('base_model'), name: slot('name')};

  const datasetSelect = h('select', {id: 'dataset', name: 'dataset_id', 'aria-describedby': 'err-dataset_id'});
  const fillDatasets = (selected) => {
    replace(datasetSelect, h('option', {value: '', text: datasets.length ? 'Choose a dataset…' : 'No datasets yet: upload one below'}),
      datasets.map((d) => h('option', {value: d.id, text: `${d.name} · ${d.image_count} images · ${fmt.age(d.created_at)}`})));
    datasetSelect.value = selected ?? '';
  };
  fillDatasets(ctx.query.get('dataset'));
  const upload = uploadBox((dataset) => {
    datasets = [dataset, ...datasets.filter((d) => d.id !== dataset.id)];
    fillDatasets(dataset.id);
    errors.dataset_id.textContent = '';
    validateSoon();
  });

  const modelSelect = h('select', {id: 'base-model', name: 'base_model', 'aria-describedby': 'err-base_model model-family',
    onchange: () => onModelChange()},
    models.map((m) => h('option', {value: m.name, text: modelLabel(m), dataset: {family: m.family ?? ''}})));
  modelSelect.value = (models.find((m) => m.available) ?? models[0])?.name ?? '';
  const familyNote = h('p', {class: 'hint', id: 'model-family'});
  const modelOf = () => models.find((m) => m.name === modelSelect.value);
  /** The model's family and what its options are (the family config's own description). */
  const showFamily = async () => {
    const model = modelOf();
    if (!model?.family) {
      familyNote.textContent = model?.problem ?? '';
      return;
    }
    const about = (await schemas(model.family).catch(() => null))?.description ?? '';
    if (modelOf() === model) familyNote.textContent = `Family: ${model.family}. ${about}`.trim();
  };
  showFamily();
  let activePreset = null;
  const nameInput = h('input', {id: 'job-name', name: 'name', type: 'text', maxlength: '200', autocomplete: 'off',
    placeholder: 'optional', 'aria-describedby': 'err-name'});

  const presetNote = h('p', {class: 'hint', id: 'preset-note'});
  const presetButtons = PRESETS.map((preset) => h('button', {type: 'button', class: 'chip', dataset: {preset: preset.id},
    text: preset.label, onclick: () => applyPreset(preset)}));
  const advanced = h('details', {class: 'advanced', id: 'advanced'},
    h('summary', {text: 'Advanced: every training option'}), options.element);
  const submit = h('button', {type: 'submit', class: 'primary', id: 'submit-job', text: 'Start training'});
  const verdict = h('p', {class: 'hint', id: 'validation', role: 'status'});
  let idempotencyKey = newKey();
  let check = null; // the pending live validation: {timer, controller}

  /**
   * Another model: another family's model rebuilds the options panel from its schema (keeping the
   * values both families share), and a chosen preset's values that depend on the model (its
   * sizes) follow it; the user's other edits stay.
   */
  let lastModel = modelSelect.value;
  async function onModelChange() {
    showFamily();
    const previous = {model: lastModel, defaults: options.defaults};
    const current = modelSelect.value;
    lastModel = current;
    const family = modelOf()?.family;
    if (family && family !== options.family) {
      let next;
      try {
        next = optionsForm(await schemas(family));
      } catch (error) {
        if (!isAbort(error)) replace(general, errorNotice(error));
        return;
      }
      if (modelSelect.value !== current) return; // changed again meanwhile
      next.apply(Object.fromEntries(Object.entries(options.values()).filter(([name]) => next.fields.has(name))));
      options.element.replaceWith(next.element);
      options = next;
    }
    if (activePreset) {
      const before = activePreset.values(previous.model, previous.defaults);
      const after = activePreset.values(current, options.defaults);
      for (const [name, value] of Object.entries(after)) {
        if (before[name] !== value) options.fields.get(name)?.set(value);
      }
    }
    validateSoon();
  }

  function applyPreset(preset) {
    activePreset = preset;
    options.apply(preset.values(modelSelect.value, options.defaults));
    for (const button of presetButtons) button.classList.toggle('active', button === presetButtons[PRESETS.indexOf(preset)]);
    const values = options.values();
    presetNote.textContent = `${preset.label}: ${preset.note}. ` + ['resolution', 'max_train_steps', 'rank', 'learning_rate']
      .filter((key) => key in values).map((key) => `${key.replaceAll('_', ' ')} ${values[key]}`).join(', ');
    validateSoon();
  }

  function clearErrors() {
    general.replaceChildren();
    Object.values(errors).forEach((slotElement) => { slotElement.textContent = ''; });
    options.clearErrors();
  }

  function showErrors(error, {quiet = false} = {}) {
    const isField = (name) => name in errors || options.fields.has(name);
    const {fields, rest} = splitMessage(error.message, isField);
    if (error.status === 404 && /^dataset /.test(error.message)) fields.set('dataset_id', error.message);
    else if (error.status === 404) rest.push(error.message);
    let first = null;
    for (const [name, text] of fields) {
      if (name in errors) {
        errors[name].textContent = text;
        first ??= errors[name].previousElementSibling;
      } else {
        const field = options.fields.get(name);
        field.showError(text);
        advanced.open = true;
        first ??= field.input;
      }
    }
    const summary = fields.size ? `The server refused ${fields.size === 1 ? 'a field' : `${fields.size} fields`}; see the message next to each.` : '';
    replace(general, h('p', {class: 'notice error'}, [summary, ...rest].filter(Boolean).join(' ') || error.message));
    if (quiet) return; // checked while typing: never move the focus away from the field in use
    (first ?? general).scrollIntoView?.({block: 'center'});
    first?.focus?.({preventScroll: true});
  }

  function requestBody() {
    const body = {dataset_id: datasetSelect.value, base_model: modelSelect.value, options: options.values()};
    if (nameInput.value.trim()) body.name = nameInput.value.trim();
    return body;
  }

  /** Ask the server, a moment after the last change, whether this submission would be accepted. */
  function validateSoon() {
    if (check) {
      clearTimeout(check.timer);
      check.controller.abort();
    }
    const controller = new AbortController();
    ctx.signal.addEventListener('abort', () => controller.abort(), {once: true});
    check = {controller, timer: setTimeout(() => validateNow(controller), 400)};
  }

  async function validateNow(controller) {
    const body = requestBody();
    if (!body.dataset_id) return;
    try {
      const checked = await post('/v1/jobs/validate', body, {signal: controller.signal});
      clearErrors();
      verdict.textContent = `Looks good: ${checked.total_steps} steps at resolution ${checked.config.resolution}.`;
    } catch (error) {
      if (isAbort(error) || controller.signal.aborted) return;
      verdict.textContent = '';
      if (error instanceof ApiError && (error.status === 422 || error.status === 404)) {
        clearErrors();
        showErrors(error, {quiet: true});
      }
    }
  }

  async function onSubmit(event) {
    event.preventDefault();
    if (check) {
      clearTimeout(check.timer);
      check.controller.abort();
    }
    clearErrors();
    verdict.textContent = '';
    const body = requestBody();
    if (!body.dataset_id) {
      errors.dataset_id.textContent = 'Choose a dataset or upload one.';
      datasetSelect.focus();
      return;
    }
    submit.disabled = true;
    submit.textContent = 'Submitting…';
    try {
      const job = await post('/v1/jobs', body, {signal: ctx.signal, headers: {'Idempotency-Key': idempotencyKey}});
      idempotencyKey = newKey();
      ctx.navigate(`/jobs/${job.id}`);
    } catch (error) {
      if (isAbort(error)) return;
      if (error instanceof ApiError) showErrors(error);
      else replace(general, errorNotice(error));
    } finally {
      submit.disabled = false;
      submit.textContent = 'Start training';
    }
  }

  return h('form', {class: 'job-form', id: 'job-form', novalidate: true, onsubmit: onSubmit,
    oninput: validateSoon, onchange: validateSoon},
    general,
    h('section', {class: 'card'}, h('h2', {text: '1. Dataset'}),
      h('div', {class: 'field'}, h('label', {for: 'dataset', text: 'Use a dataset'}), datasetSelect, errors.dataset_id),
      h('p', {class: 'or', text: 'or upload a new one'}), upload),
    h('section', {class: 'card'}, h('h2', {text: '2. Model'}),
      h('div', {class: 'row-2'},
        h('div', {class: 'field'}, h('label', {for: 'base-model', text: 'Base model'}), modelSelect, familyNote,
          errors.base_model),
        h('div', {class: 'field'}, h('label', {for: 'job-name', text: 'Job name'}), nameInput, errors.name))),
    h('section', {class: 'card'}, h('h2', {text: '3. Training'}),
      h('div', {class: 'chips', role: 'group', 'aria-label': 'Presets'}, presetButtons), presetNote, advanced),
    h('div', {class: 'submit-bar'}, verdict, submit));
}

/** A random Idempotency-Key: a double click or a resent request makes one job, not two. */
function newKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `dash-${[...bytes].map((b) => b.toString(16).padStart(2, '0')).join('')}`;
}
