// Display helpers: enum labels, times, durations, sizes.

import { timestampDate, type Duration, type Timestamp } from "@bufbuild/protobuf/wkt";

/** "WORKER_STATE_SHUTTING_DOWN"-style generated enum member → "Shutting down". */
export function enumLabel(e: Record<number, string>, value: number): string {
  const name = e[value];
  if (name === undefined) return `#${value}`;
  if (name === "UNSPECIFIED") return "—";
  const words = name.toLowerCase().split("_");
  return words.map((w, i) => (i === 0 ? w.charAt(0).toUpperCase() + w.slice(1) : w)).join(" ");
}

/** A Timestamp as a Date, or undefined when unset. */
export function toDate(ts: Timestamp | undefined): Date | undefined {
  if (!ts) return undefined;
  return timestampDate(ts);
}

/** Local date and time, e.g. "2025-05-01 14:03". */
export function fmtTime(ts: Timestamp | Date | undefined): string {
  const d = ts instanceof Date ? ts : toDate(ts);
  if (!d) return "—";
  const pad = (n: number) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

/** Relative time, e.g. "3 min ago" / "in 2 h". */
export function fmtAgo(ts: Timestamp | Date | undefined, now: number = Date.now()): string {
  const d = ts instanceof Date ? ts : toDate(ts);
  if (!d) return "—";
  const s = Math.round((d.getTime() - now) / 1000);
  const abs = Math.abs(s);
  const txt = abs < 60 ? `${abs} s` : abs < 3600 ? `${Math.round(abs / 60)} min` : abs < 86400 ? `${Math.round(abs / 3600)} h` : `${Math.round(abs / 86400)} d`;
  return s <= 0 ? `${txt} ago` : `in ${txt}`;
}

/** A Duration in seconds. */
export function durationSeconds(d: Duration | undefined): number {
  if (!d) return 0;
  return Number(d.seconds) + d.nanos / 1e9;
}

/** Seconds as "1 h 30 min" / "45 s" / "250 ms". */
export function fmtSeconds(sec: number): string {
  if (sec < 1) return `${Math.round(sec * 1000)} ms`;
  if (sec < 60) return `${Math.round(sec)} s`;
  const h = Math.floor(sec / 3600);
  const m = Math.round((sec % 3600) / 60);
  if (h === 0) return `${m} min`;
  return m ? `${h} h ${m} min` : `${h} h`;
}

/** Byte counts as GiB / MiB. */
export function fmtBytes(n: bigint | number): string {
  const v = Number(n);
  if (v >= 1024 ** 3) return `${(v / 1024 ** 3).toFixed(1)} GiB`;
  if (v >= 1024 ** 2) return `${(v / 1024 ** 2).toFixed(0)} MiB`;
  return `${v} B`;
}

/** A percentage 0..100 with no decimals. */
export function pct(used: number, total: number): number {
  if (total <= 0) return 0;
  return Math.max(0, Math.min(100, Math.round((used / total) * 100)));
}

/** Shortens a UUID for tables. */
export function shortId(id: string): string {
  return id.length > 12 ? id.slice(0, 8) : id;
}
