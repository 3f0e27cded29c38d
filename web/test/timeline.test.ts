import { describe, expect, it } from "vitest";
import { MIN_BAR_PX, layoutBars, stepAreaPath, ticks, xOf } from "../src/lib/timeline";

const H = 3_600_000;
const span = (b: { s: number; e: number }) => ({ start: b.s, end: b.e });

describe("layoutBars", () => {
  it("scales bookings to px and stacks overlaps into lanes, reusing freed lanes", () => {
    const items = [
      { id: "a", s: 0, e: 2 * H },
      { id: "b", s: 1 * H, e: 3 * H },
      { id: "c", s: 2 * H, e: 4 * H }, // a is over: back to lane 0
      { id: "d", s: 2.5 * H, e: 3.5 * H }, // a free? lane0 taken by c, lane1 by b until 3h → lane 2
    ];
    const { bars, lanes } = layoutBars(items, span, 0, 4 * H, 400);
    const byId = Object.fromEntries(bars.map((b) => [b.item.id, b]));
    expect(lanes).toBe(3);
    expect(byId.a).toMatchObject({ lane: 0, x: 0, width: 200 });
    expect(byId.b).toMatchObject({ lane: 1, x: 100, width: 200 });
    expect(byId.c).toMatchObject({ lane: 0, x: 200, width: 200 });
    expect(byId.d).toMatchObject({ lane: 2, x: 250, width: 100 });
  });

  it("clips at the window edges, marks clipped ends and drops what is outside", () => {
    const items = [
      { id: "early", s: -2 * H, e: 1 * H },
      { id: "late", s: 3 * H, e: 10 * H },
      { id: "before", s: -5 * H, e: -1 * H },
      { id: "after", s: 5 * H, e: 6 * H },
    ];
    const { bars } = layoutBars(items, span, 0, 4 * H, 400);
    expect(bars.map((b) => b.item.id)).toEqual(["early", "late"]);
    expect(bars[0]).toMatchObject({ x: 0, width: 100, clippedLeft: true, clippedRight: false });
    expect(bars[1]).toMatchObject({ x: 300, width: 100, clippedLeft: false, clippedRight: true });
  });

  it("keeps very short bookings visible without running past the plot", () => {
    const { bars } = layoutBars([{ id: "blip", s: 4 * H - 1000, e: 4 * H }], span, 0, 4 * H, 400);
    expect(bars[0]!.width).toBeLessThanOrEqual(400 - bars[0]!.x);
    const { bars: mid } = layoutBars([{ id: "blip", s: H, e: H + 1000 }], span, 0, 4 * H, 400);
    expect(mid[0]!.width).toBe(MIN_BAR_PX);
  });

  it("maps time linearly", () => {
    expect(xOf(H, 0, 4 * H, 400)).toBe(100);
    expect(xOf(5 * H, 0, 4 * H, 400)).toBe(500);
    expect(xOf(1, 5, 5, 400)).toBe(0);
  });
});

describe("ticks", () => {
  it("picks the smallest step giving at most maxTicks, aligned to whole steps", () => {
    const start = Date.UTC(2030, 0, 1, 10, 17);
    const t = ticks(start, start + 24 * H, 12, 0);
    expect(t.length).toBeLessThanOrEqual(12);
    expect(t[1]! - t[0]!).toBe(2 * H);
    expect(new Date(t[0]!).getUTCHours()).toBe(12);
    expect(new Date(t[0]!).getUTCMinutes()).toBe(0);
    expect(t.every((x) => x >= start && x <= start + 24 * H)).toBe(true);
  });

  it("aligns to local midnight with a time zone offset", () => {
    const start = Date.UTC(2030, 0, 1, 0, 0);
    const offset = 2 * H; // UTC+2
    const t = ticks(start, start + 7 * 24 * H, 8, offset);
    expect(t[1]! - t[0]!).toBe(24 * H);
    expect((t[0]! + offset) % (24 * H)).toBe(0);
  });

  it("is empty for an empty window", () => {
    expect(ticks(10, 10)).toEqual([]);
  });
});

describe("stepAreaPath", () => {
  it("draws the used fraction of each step, clipped to the window", () => {
    const d = stepAreaPath(
      [
        { start: 0, end: 2 * H, used: 0.5 },
        { start: 2 * H, end: 6 * H, used: 1.5 },
      ],
      0,
      4 * H,
      400,
      10,
    );
    expect(d).toBe("M0.0,10 L0.0,5.0 L200.0,5.0 L200.0,0.0 L400.0,0.0 L400.0,10 Z");
    expect(stepAreaPath([], 0, 1, 1, 1)).toBe("");
  });
});
