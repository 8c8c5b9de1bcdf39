// A dataset's pre-flight report as the server wrote it: counts, sizes and every problem found.

import {h} from '../dom.js';

export function reportSummary(report, {compact = false} = {}) {
  const missing = report.uncaptioned_count;
  const size = (pair) => (pair ? `${pair[0]}×${pair[1]}` : '—');
  const small = Object.entries(report.smaller_than || {}).filter(([, count]) => count > 0)
    .map(([side, count]) => `${count} under ${side} px`).join(', ');
  const facts = [
    ['Images', report.image_count],
    ['Captioned', report.captioned_count],
    ['Missing captions', missing],
    ['Refused files', report.refused.length],
    ['Smallest', size(report.min_size)],
    ['Largest', size(report.max_size)],
    // aspect-ratio buckets (enable_bucket) with the default options at the families' resolutions
    ...(report.bucket_plans || []).map((plan) => [`Buckets at ${plan.resolution}`,
      plan.buckets.map((b) => `${b.width}×${b.height}: ${b.images}`).join(', ') || '—']),
  ];
  const problems = [];
  if (missing) problems.push(h('li', {text: `${missing} image(s) have no caption; jobs train them with an empty caption.`}));
  if (small) problems.push(h('li', {text: `Short side: ${small}.`}));
  if (report.long_captions?.count) {
    problems.push(h('li', {text: `${report.long_captions.count} caption(s) longer than ${report.long_captions.limit} tokens` +
      ` (${report.long_captions.note}): ${report.long_captions.files.join(', ')}`}));
  }
  for (const group of report.duplicates || []) problems.push(h('li', {text: `Identical images: ${group.join(', ')}`}));
  for (const warning of report.warnings || []) problems.push(h('li', {text: warning}));

  const refused = report.refused.length ? h('div', {class: 'refused'},
    h('h4', {text: `Refused files (${report.refused.length})`}),
    h('ul', {}, report.refused.map((item) => h('li', {}, h('span', {class: 'mono', text: item.file}), ` — ${item.reason}`)))) : null;
  const list = problems.length ? h('ul', {class: 'problems'}, problems) : null;

  if (compact) {
    if (!refused && !list) return h('span');
    return h('details', {class: 'report-details'}, h('summary', {text: 'Upload report'}), list, refused);
  }
  return h('div', {class: 'report', dataset: {imageCount: String(report.image_count)}},
    h('dl', {class: 'report-facts'}, facts.flatMap(([label, value]) => [
      h('dt', {text: label}),
      h('dd', {class: (label === 'Missing captions' || label === 'Refused files') && value ? 'warn' : '', text: String(value)}),
    ])),
    list, refused);
}
