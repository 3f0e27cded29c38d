// Layout math of the booking time line (Gantt): time → x, overlap-free
// lanes for bookings, clipping at the window edges, and tick marks.

/** Smallest width of a drawn bar, in px, so very short bookings stay visible. */
export const MIN_BAR_PX = 3;

/** One placed bar. */
export interface Bar<T> {
  item: T;
  /** Row within its worker (0-based); overlapping bookings get different lanes. */
  lane: number;
  x: number;
  width: number;
  /** The booking starts before the window. */
  clippedLeft: boolean;
  /** The booking ends after the window. */
  clippedRight: boolean;
}

/** x position (px) of instant `t` (ms) in a window of `width` px. Not clamped. */
export function xOf(t: number, windowStart: number, windowEnd: number, width: number): number {
  const span = windowEnd - windowStart;
  if (span <= 0) return 0;
  return ((t - windowStart) / span) * width;
}

/**
 * Places intervals into lanes (greedy interval partitioning: sort by start,
 * reuse the first lane that is free again), clips them to the window and
 * scales them to px. Intervals outside the window are dropped; an interval
 * with end ≤ start is treated as a point of MIN_BAR_PX.
 */
export function layoutBars<T>(
  items: readonly T[],
  span: (item: T) => { start: number; end: number },
  windowStart: number,
  windowEnd: number,
  width: number,
): { bars: Bar<T>[]; lanes: number } {
  const visible = items
    .map((item) => ({ item, ...span(item) }))
    .filter((s) => Math.max(s.end, s.start) > windowStart && s.start < windowEnd)
    .sort((a, b) => a.start - b.start || a.end - b.end);
  const laneEnds: number[] = [];
  const bars: Bar<T>[] = [];
  for (const s of visible) {
    const end = Math.max(s.end, s.start);
    let lane = laneEnds.findIndex((e) => e <= s.start);
    if (lane === -1) {
      lane = laneEnds.length;
      laneEnds.push(end);
    } else {
      laneEnds[lane] = end;
    }
    const a = Math.max(s.start, windowStart);
    const b = Math.min(end, windowEnd);
    const x = xOf(a, windowStart, windowEnd, width);
    const w = Math.max(MIN_BAR_PX, xOf(b, windowStart, windowEnd, width) - x);
    bars.push({ item: s.item, lane, x, width: Math.min(w, width - x), clippedLeft: s.start < windowStart, clippedRight: end > windowEnd });
  }
  return { bars, lanes: laneEnds.length };
}

const HOUR = 3_600_000;
/** Tick steps tried, smallest first. */
export const TICK_STEPS_MS = [15 * 60_000, 30 * 60_000, HOUR, 2 * HOUR, 3 * HOUR, 6 * HOUR, 12 * HOUR, 24 * HOUR, 48 * HOUR, 7 * 24 * HOUR];

/**
 * Tick instants for a window: the smallest step from TICK_STEPS_MS giving
 * at most `maxTicks` ticks, aligned to multiples of the step in local time
 * (so ticks fall on whole hours / midnights).
 */
export function ticks(windowStart: number, windowEnd: number, maxTicks = 12, tzOffsetMs = new Date(windowStart).getTimezoneOffset() * -60_000): number[] {
  const span = windowEnd - windowStart;
  if (span <= 0 || maxTicks < 1) return [];
  const step = TICK_STEPS_MS.find((s) => span / s <= maxTicks) ?? TICK_STEPS_MS[TICK_STEPS_MS.length - 1]!;
  const first = Math.ceil((windowStart + tzOffsetMs) / step) * step - tzOffsetMs;
  const out: number[] = [];
  for (let t = first; t <= windowEnd; t += step) out.push(t);
  return out;
}

/** One step of a capacity step function, as fractions of the declared capacity. */
export interface StepPoint {
  start: number;
  end: number;
  /** Used fraction 0..1. */
  used: number;
}

/** SVG path ("M…L…Z") of a filled step chart of `points` within a box of width × height. */
export function stepAreaPath(points: readonly StepPoint[], windowStart: number, windowEnd: number, width: number, height: number): string {
  const segs = points
    .filter((p) => p.end > windowStart && p.start < windowEnd)
    .sort((a, b) => a.start - b.start);
  if (segs.length === 0) return "";
  const y = (u: number) => height - Math.max(0, Math.min(1, u)) * height;
  const cmds: string[] = [];
  const x0 = xOf(Math.max(segs[0]!.start, windowStart), windowStart, windowEnd, width);
  cmds.push(`M${x0.toFixed(1)},${height}`);
  for (const s of segs) {
    const a = xOf(Math.max(s.start, windowStart), windowStart, windowEnd, width);
    const b = xOf(Math.min(s.end, windowEnd), windowStart, windowEnd, width);
    cmds.push(`L${a.toFixed(1)},${y(s.used).toFixed(1)}`, `L${b.toFixed(1)},${y(s.used).toFixed(1)}`);
  }
  const xl = xOf(Math.min(segs[segs.length - 1]!.end, windowEnd), windowStart, windowEnd, width);
  cmds.push(`L${xl.toFixed(1)},${height}`, "Z");
  return cmds.join(" ");
}
