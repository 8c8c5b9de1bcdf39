// Numbers, sizes, times and durations as people read them.

export function bytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let value = n;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

/** 3725 -> "1 h 2 min"; 42 -> "42 s" */
export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return '—';
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60 ? `${s % 60} s` : ''}`.trim();
  const hours = Math.floor(s / 3600);
  if (hours < 48) return `${hours} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(hours / 24)} d ${hours % 24} h`;
}

/** "3 min ago" from an ISO time */
export function age(iso, now = Date.now()) {
  if (!iso) return '—';
  const seconds = (now - Date.parse(iso)) / 1000;
  if (seconds < 45) return 'just now';
  const text = duration(seconds).split(' ').slice(0, 2).join(' ');
  return `${text} ago`;
}

export function dateTime(iso) {
  if (!iso) return '—';
  return new Date(iso).toLocaleString(undefined, {dateStyle: 'medium', timeStyle: 'medium'});
}

/** Losses and rates: four significant digits, small ones in exponent form. */
export function number(value, digits = 4) {
  if (value === null || value === undefined || !Number.isFinite(value)) return '—';
  if (value !== 0 && Math.abs(value) < 1e-3) return value.toExponential(2);
  return Number(value.toPrecision(digits)).toString();
}

export function shortId(id) {
  return id ? id.slice(0, 8) : '';
}
