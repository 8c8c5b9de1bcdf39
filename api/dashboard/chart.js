// Line charts on a step axis with uPlot (from node_modules, served at /vendor/uplot). The library
// is imported on first use, so a page still works, without charts, if it is missing.

import {h} from './dom.js';
import {number} from './format.js';

let library = null;

function loadUplot() {
  library ??= import('/vendor/uplot/uPlot.esm.js').then((module) => module.default);
  return library;
}

/**
 * A chart in `container`: series = [{label, stroke, width}], y = the y axis' label.
 * Returns {set(xs, ...ys), destroy()}; `container.dataset.points` counts the x values drawn.
 */
export function lineChart(container, {series, y, height = 240}) {
  const box = h('div', {class: 'chart-box'});
  const note = h('p', {class: 'chart-empty muted', text: 'No points yet.'});
  container.append(box, note);
  let plot = null;
  let data = [[], ...series.map(() => [])];
  let destroyed = false;
  const resize = new ResizeObserver(() => plot?.setSize({width: box.clientWidth, height}));

  loadUplot().then((uPlot) => {
    if (destroyed) return;
    plot = new uPlot({
      width: box.clientWidth || 600,
      height,
      scales: {x: {time: false}},
      cursor: {drag: {x: true, y: false}},
      legend: {live: true},
      hooks: {setData: [showLast], setLegend: [showLast]},
      series: [{label: 'step', value: (u, v) => (v === null ? '—' : String(v))},
        ...series.map((s) => ({label: s.label, stroke: s.stroke, width: s.width ?? 1.5, points: {show: false},
          value: (u, v) => number(v), spanGaps: true}))],
      axes: [
        {label: 'step', stroke: '#667085', grid: {stroke: '#eef0f3'}, ticks: {stroke: '#eef0f3'}},
        {label: y, stroke: '#667085', size: 64, grid: {stroke: '#eef0f3'}, ticks: {stroke: '#eef0f3'},
          values: (u, values) => values.map((v) => number(v, 3))},
      ],
    }, data, box);
    resize.observe(box);
  }).catch(() => {
    note.textContent = 'Charts need the uPlot package: run `make setup` (npm ci) on the server.';
  });

  return {
    set(xs, ...ys) {
      data = [xs, ...ys];
      container.dataset.points = String(xs.length);
      note.hidden = xs.length > 0;
      plot?.setData(data);
    },
    destroy() {
      destroyed = true;
      resize.disconnect();
      plot?.destroy();
    },
  };
}

/** Away from the cursor the legend shows the newest values, not dashes. */
function showLast(plot) {
  const count = plot.data[0].length;
  if (count && plot.cursor.idx == null) plot.setLegend({idx: count - 1}, false);
}

/** Exponential moving average with bias correction (as TensorBoard's smoothing). */
export function smooth(values, weight = 0.9) {
  const out = new Array(values.length);
  let average = 0;
  let count = 0;
  for (let i = 0; i < values.length; i += 1) {
    const value = values[i];
    if (value === null || !Number.isFinite(value)) {
      out[i] = null;
      continue;
    }
    count += 1;
    average = weight * average + (1 - weight) * value;
    out[i] = average / (1 - weight ** count);
  }
  return out;
}
