import { afterEach, describe, expect, it } from "vitest";
import { BACKOFF_BASE_MS, BACKOFF_MAX_MS, LiveFeed, SseParser, backoffDelay, decodeWatchEvent, type FeedStatus } from "../src/api/sse";
import type { WatchEventsResponse } from "../src/gen/ccm/v1/event_pb";
import { ChangeType, ResourceKind } from "../src/gen/ccm/v1/event_pb";
import { WorkerState } from "../src/gen/ccm/v1/worker_pb";
import { serve } from "./helpers";

describe("SseParser", () => {
  it("parses events split across chunks, with CRLF, comments, multi-line data and ids", () => {
    const p = new SseParser();
    const out = [
      ...p.push(": heartbeat\r\nretry: 3000\r\n\r\nevent: change\r\nid: 4"),
      ...p.push("2\r\ndata: {\"a\":\r"),
      ...p.push("\ndata: 1}\r\n\r\n"),
      ...p.push("event: bookmark\nid: 43\ndata: {}\n\n"),
    ];
    expect(out).toEqual([
      // retry is the stream's advised reconnection time, reported with every later event
      { event: "change", id: "42", data: '{"a":\n1}', retry: 3000 },
      { event: "bookmark", id: "43", data: "{}", retry: 3000 },
    ]);
  });

  it("keeps the last id for events without one and ignores events without data", () => {
    const p = new SseParser();
    const out = p.push("id: 7\n\ndata: x\n\nevent: noop\n\n");
    expect(out).toEqual([{ event: "message", id: "7", data: "x", retry: undefined }]);
  });

  it("strips only one leading space and accepts fields without a colon", () => {
    const p = new SseParser();
    expect(p.push("data:  two\ndata\n\n")).toEqual([{ event: "message", id: undefined, data: " two\n", retry: undefined }]);
  });
});

describe("backoffDelay", () => {
  it("doubles from the base and caps at the maximum, with jitter in [half, full]", () => {
    expect(backoffDelay(0, () => 0)).toBe(BACKOFF_BASE_MS / 2);
    expect(backoffDelay(0, () => 1)).toBe(BACKOFF_BASE_MS);
    expect(backoffDelay(3, () => 1)).toBe(8 * BACKOFF_BASE_MS);
    expect(backoffDelay(10, () => 1)).toBe(BACKOFF_MAX_MS);
    expect(backoffDelay(1000, () => 0.5)).toBe(Math.round(BACKOFF_MAX_MS * 0.75));
    for (let a = 0; a < 12; a++) {
      const d = backoffDelay(a);
      const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** a);
      expect(d).toBeGreaterThanOrEqual(cap / 2);
      expect(d).toBeLessThanOrEqual(cap);
    }
  });
});

describe("decodeWatchEvent", () => {
  it("decodes the gateway's change event (name = oneof field, data = inner message)", () => {
    const m = decodeWatchEvent({ event: "change", id: "12", retry: undefined, data: JSON.stringify({ revision: "12", kind: "RESOURCE_KIND_WORKER", type: "CHANGE_TYPE_MODIFIED", resourceId: "w1", worker: { id: "w1", state: "WORKER_STATE_DRAINING" } }) });
    expect(m?.item.case).toBe("change");
    if (m?.item.case !== "change") throw new Error("unreachable");
    expect(m.item.value.kind).toBe(ResourceKind.WORKER);
    expect(m.item.value.type).toBe(ChangeType.MODIFIED);
    expect(m.item.value.resource.case).toBe("worker");
    if (m.item.value.resource.case === "worker") expect(m.item.value.resource.value.state).toBe(WorkerState.DRAINING);
  });

  it("also accepts a whole WatchEventsResponse as data, and ignores junk", () => {
    expect(decodeWatchEvent({ event: "message", id: undefined, retry: undefined, data: '{"bookmark":{"revision":"5"}}' })?.item.case).toBe("bookmark");
    expect(decodeWatchEvent({ event: "message", id: undefined, retry: undefined, data: "not json" })).toBeUndefined();
    expect(decodeWatchEvent({ event: "message", id: undefined, retry: undefined, data: "[1]" })).toBeUndefined();
  });
});

// LiveFeed against a real loopback SSE server. Reconnect delays are recorded
// and run at once so the test is quick; the delays themselves are checked.
let close: (() => Promise<void>) | undefined;
afterEach(async () => {
  await close?.();
  close = undefined;
});

function change(rev: number, state: string): string {
  return `event: change\nid: ${rev}\ndata: ${JSON.stringify({ revision: String(rev), kind: "RESOURCE_KIND_WORKER", type: "CHANGE_TYPE_MODIFIED", resourceId: "w1", worker: { id: "w1", state } })}\n\n`;
}

function feedHarness(paths: string[], base: string, opts: { onFresh?: () => void; onUnauthenticated?: () => void } = {}) {
  const events: WatchEventsResponse[] = [];
  const statuses: FeedStatus[] = [];
  const delays: number[] = [];
  const feed = new LiveFeed({
    paths: paths.map((p) => base + p),
    query: "kinds=RESOURCE_KIND_WORKER",
    onEvent: (e) => events.push(e),
    onStatus: (s) => statuses.push(s),
    setTimeout: (fn, ms) => {
      delays.push(ms);
      return setTimeout(fn, 0);
    },
    random: () => 1,
    ...opts,
  });
  return { feed, events, statuses, delays };
}

async function until(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 400; i++) {
    if (cond()) return;
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`timed out waiting for ${what}`);
}

describe("LiveFeed", () => {
  it("resumes with Last-Event-ID after the stream drops, backing off between failures", async () => {
    const srv = await serve((req, res, _b, n) => {
      if (n === 1) {
        res.writeHead(200, { "Content-Type": "text/event-stream" });
        res.end(`retry: 3000\n\n${change(10, "WORKER_STATE_RUNNING")}${change(11, "WORKER_STATE_DRAINING")}`);
      } else if (n === 2 || n === 3) {
        res.writeHead(503, { "Content-Type": "application/problem+json" });
        res.end('{"title":"Service Unavailable","detail":"backend down"}');
      } else {
        res.writeHead(200, { "Content-Type": "text/event-stream" });
        res.write(change(12, "WORKER_STATE_STOPPING"));
        void req;
      }
    });
    close = srv.close;
    let fresh = 0;
    const h = feedHarness(["/v1/events:stream"], srv.base, { onFresh: () => fresh++ });
    h.feed.start();
    await until(() => h.events.length === 3, "three change events");
    h.feed.stop();
    expect(srv.seen[0]!.url).toBe("/v1/events:stream?kinds=RESOURCE_KIND_WORKER");
    expect(srv.seen[0]!.headers["last-event-id"]).toBeUndefined();
    expect(srv.seen[1]!.headers["last-event-id"]).toBe("11");
    expect(srv.seen[3]!.headers["last-event-id"]).toBe("11");
    expect(h.feed.lastEventId).toBe("12");
    // dropped stream → 1 s, then two 503s → 2 s, 4 s; a good event resets the count
    expect(h.delays).toEqual([1000, 2000, 4000]);
    expect(h.feed.attempt).toBe(0);
    expect(h.statuses[0]).toBe("connecting");
    expect(h.statuses).toContain("live");
    expect(h.statuses).toContain("reconnecting");
    // only the first connection was fresh (the others resumed)
    expect(fresh).toBe(1);
  });

  it("falls back to the next path on 404", async () => {
    const srv = await serve((req, res) => {
      if (req.url?.startsWith("/v1/events:stream")) {
        res.writeHead(404);
        res.end();
      } else {
        res.writeHead(200, { "Content-Type": "text/event-stream" });
        res.write(change(3, "WORKER_STATE_RUNNING"));
      }
    });
    close = srv.close;
    const h = feedHarness(["/v1/events:stream", "/v1/events:watch"], srv.base);
    h.feed.start();
    await until(() => h.events.length === 1, "an event on the fallback path");
    h.feed.stop();
    expect(srv.seen.map((s) => s.url.split("?")[0])).toEqual(["/v1/events:stream", "/v1/events:watch"]);
    expect(h.delays).toEqual([]);
  });

  it("stops and reports on 401 instead of retrying", async () => {
    const srv = await serve((_req, res) => {
      res.writeHead(401, { "Content-Type": "application/problem+json" });
      res.end("{}");
    });
    close = srv.close;
    let unauth = 0;
    const h = feedHarness(["/s"], srv.base, { onUnauthenticated: () => unauth++ });
    h.feed.start();
    await until(() => h.statuses.includes("unauthorized"), "unauthorized");
    await new Promise((r) => setTimeout(r, 50));
    expect(unauth).toBe(1);
    expect(srv.seen).toHaveLength(1);
    expect(h.delays).toEqual([]);
  });

  it("forgets its position on a reset and reconnects fresh", async () => {
    let fresh = 0;
    const srv = await serve((_req, res, _b, n) => {
      res.writeHead(200, { "Content-Type": "text/event-stream" });
      if (n === 1) res.end(`${change(5, "WORKER_STATE_RUNNING")}event: reset\ndata: {"reason":"WATCH_RESET_REASON_COMPACTED","currentRevision":"90"}\n\n`);
      else res.write(change(91, "WORKER_STATE_RUNNING"));
    });
    close = srv.close;
    const h = feedHarness(["/s"], srv.base, { onFresh: () => fresh++ });
    h.feed.start();
    await until(() => h.events.length === 3, "change, reset, change");
    h.feed.stop();
    expect(h.events.map((e) => e.item.case)).toEqual(["change", "reset", "change"]);
    expect(srv.seen[1]!.headers["last-event-id"]).toBeUndefined();
    expect(fresh).toBe(2);
  });

  it("reports offline after repeated failures and keeps trying", async () => {
    const srv = await serve((_req, res) => {
      res.writeHead(502);
      res.end();
    });
    close = srv.close;
    const h = feedHarness(["/s"], srv.base);
    h.feed.start();
    await until(() => h.statuses.includes("offline"), "offline");
    h.feed.stop();
    const first = h.statuses.indexOf("offline");
    expect(h.statuses.slice(1, first)).toEqual(["reconnecting", "reconnecting", "reconnecting"]);
    expect(h.delays.slice(0, 4)).toEqual([1000, 2000, 4000, 8000]);
  });
});
