// Live change feed over Server-Sent Events: the gateway relays
// EventService.WatchEvents as SSE (`id:` = revision). This module has a
// spec-following incremental SSE parser, the reconnect backoff, and LiveFeed,
// which keeps one stream open, resumes with Last-Event-ID after a drop, and
// reports its connection state for the UI badge. It uses fetch streaming (not
// EventSource) so it can send Last-Event-ID itself, see 401/403/404 answers
// and control the backoff.

import { fromJson, type JsonValue } from "@bufbuild/protobuf";
import { WatchEventsResponseSchema, type WatchEventsResponse, type WatchEventsResponseJson } from "../gen/ccm/v1/event_pb";

/** One dispatched SSE event. */
export interface SseEvent {
  event: string;
  data: string;
  id: string | undefined;
  retry: number | undefined;
}

/** Incremental text/event-stream parser (WHATWG HTML §9.2.6). */
export class SseParser {
  private buf = "";
  private data: string[] = [];
  private event = "";
  private id: string | undefined;
  private retry: number | undefined;
  private sawCr = false;

  /** Feeds a chunk of decoded text and returns the events it completed. */
  push(chunk: string): SseEvent[] {
    const out: SseEvent[] = [];
    let text = chunk;
    if (this.sawCr && text.startsWith("\n")) text = text.slice(1);
    this.sawCr = false;
    this.buf += text;
    for (;;) {
      const m = /\r\n|\r|\n/.exec(this.buf);
      if (!m) break;
      // A lone "\r" at the very end may be the first half of "\r\n".
      if (m[0] === "\r" && m.index === this.buf.length - 1) {
        this.sawCr = true;
      }
      const line = this.buf.slice(0, m.index);
      this.buf = this.buf.slice(m.index + m[0].length);
      const ev = this.line(line);
      if (ev) out.push(ev);
    }
    return out;
  }

  private line(line: string): SseEvent | undefined {
    if (line === "") {
      if (this.data.length === 0) {
        this.event = "";
        return undefined;
      }
      const ev: SseEvent = { event: this.event || "message", data: this.data.join("\n"), id: this.id, retry: this.retry };
      this.data = [];
      this.event = "";
      return ev;
    }
    if (line.startsWith(":")) return undefined;
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    switch (field) {
      case "data":
        this.data.push(value);
        break;
      case "event":
        this.event = value;
        break;
      case "id":
        if (!value.includes("\0")) this.id = value;
        break;
      case "retry":
        if (/^\d+$/.test(value)) this.retry = Number(value);
        break;
      default:
        break;
    }
    return undefined;
  }
}

/** First reconnect delay. */
export const BACKOFF_BASE_MS = 1000;
/** Longest reconnect delay. */
export const BACKOFF_MAX_MS = 30_000;

/**
 * Delay before reconnect attempt `attempt` (0-based): BASE·2^attempt capped
 * at MAX, with "equal jitter" (half fixed, half random) so many browsers do
 * not reconnect in step after a gateway restart.
 */
export function backoffDelay(attempt: number, random: () => number = Math.random, base = BACKOFF_BASE_MS, max = BACKOFF_MAX_MS): number {
  const exp = Math.min(max, base * 2 ** Math.max(0, Math.min(attempt, 30)));
  return Math.round(exp / 2 + (exp / 2) * random());
}

/**
 * Turns one SSE event into a WatchEventsResponse. Accepts the relayed
 * message itself (`{"change": …}` / `{"bookmark": …}` / `{"reset": …}`), or
 * an event named change/bookmark/reset whose data is the inner message.
 * Returns undefined for heartbeats and unknown events.
 */
export function decodeWatchEvent(ev: SseEvent): WatchEventsResponse | undefined {
  if (!ev.data.trim()) return undefined;
  let json: unknown;
  try {
    json = JSON.parse(ev.data);
  } catch {
    return undefined;
  }
  if (!json || typeof json !== "object" || Array.isArray(json)) return undefined;
  const o = json as Record<string, unknown>;
  let msg: WatchEventsResponseJson | undefined;
  if ("change" in o || "bookmark" in o || "reset" in o) {
    msg = o as WatchEventsResponseJson;
  } else if (ev.event === "change" || ev.event === "bookmark" || ev.event === "reset") {
    msg = { [ev.event]: o } as WatchEventsResponseJson;
  } else if ("revision" in o && "kind" in o) {
    msg = { change: o } as WatchEventsResponseJson;
  }
  if (!msg) return undefined;
  return fromJson(WatchEventsResponseSchema, msg as JsonValue, { ignoreUnknownFields: true });
}

/** Connection state shown by the badge. */
export type FeedStatus = "connecting" | "live" | "reconnecting" | "offline" | "unauthorized";

/** Options of a LiveFeed. */
export interface LiveFeedOptions {
  /** Stream URLs to try in order (the first that is not 404 is kept). */
  paths: string[];
  /** Extra query string (filters), without "?". */
  query?: string;
  onEvent: (ev: WatchEventsResponse) => void;
  onStatus: (status: FeedStatus, detail?: string) => void;
  /** Called when a connection opened without resuming (the client must re-list). */
  onFresh?: () => void;
  /** Called on 401. */
  onUnauthenticated?: () => void;
  fetch?: typeof fetch;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (h: unknown) => void;
  random?: () => number;
  /** Give up after this many failed attempts in a row (then "offline", still retrying at MAX). */
  offlineAfter?: number;
}

/** One resumable SSE subscription with reconnect and backoff. */
export class LiveFeed {
  /** Last revision seen (the SSE id), sent as Last-Event-ID on reconnect. */
  lastEventId: string | undefined;
  /** Failed attempts since the last successful event. */
  attempt = 0;
  /** The last `error` event's text, reported with the next retry. */
  lastError: string | undefined;
  private pathIndex = 0;
  private abort: AbortController | undefined;
  private timer: unknown;
  private stopped = true;
  private readonly o: Required<Omit<LiveFeedOptions, "query" | "onFresh" | "onUnauthenticated">> & LiveFeedOptions;

  constructor(opts: LiveFeedOptions) {
    this.o = {
      fetch: (i, n) => globalThis.fetch(i, n),
      setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
      clearTimeout: (h) => globalThis.clearTimeout(h as ReturnType<typeof setTimeout>),
      random: Math.random,
      offlineAfter: 3,
      ...opts,
    };
  }

  /** Opens the stream (idempotent). */
  start(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.o.onStatus("connecting");
    void this.connect();
  }

  /** Closes the stream and cancels any pending reconnect. */
  stop(): void {
    this.stopped = true;
    this.abort?.abort();
    if (this.timer !== undefined) this.o.clearTimeout(this.timer);
    this.timer = undefined;
  }

  /** Reconnects now (e.g. the user clicked the badge). */
  reconnectNow(): void {
    if (this.stopped) return;
    this.abort?.abort();
    if (this.timer !== undefined) this.o.clearTimeout(this.timer);
    this.timer = undefined;
    void this.connect();
  }

  private url(): string {
    const path = this.o.paths[this.pathIndex] ?? this.o.paths[0] ?? "";
    return this.o.query ? `${path}?${this.o.query}` : path;
  }

  private async connect(): Promise<void> {
    const ac = new AbortController();
    this.abort = ac;
    const headers: Record<string, string> = { Accept: "text/event-stream" };
    const resuming = this.lastEventId !== undefined;
    if (resuming) headers["Last-Event-ID"] = this.lastEventId!;
    let res: Response;
    try {
      res = await this.o.fetch(this.url(), { headers, signal: ac.signal, credentials: "same-origin", cache: "no-store" });
    } catch (e) {
      if (ac.signal.aborted) return;
      return this.retry(e instanceof Error ? e.message : String(e));
    }
    if (res.status === 401) {
      this.o.onStatus("unauthorized", "session ended");
      this.stopped = true;
      this.o.onUnauthenticated?.();
      return;
    }
    if (res.status === 404 && this.pathIndex + 1 < this.o.paths.length) {
      this.pathIndex++;
      return this.connect();
    }
    if (!res.ok || !res.body) {
      return this.retry(`HTTP ${res.status}`);
    }
    this.o.onStatus("live");
    if (!resuming) this.o.onFresh?.();
    const parser = new SseParser();
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const ev of parser.push(decoder.decode(value, { stream: true }))) {
          this.dispatch(ev);
        }
      }
    } catch (e) {
      if (ac.signal.aborted) return;
      return this.retry(e instanceof Error ? e.message : String(e));
    }
    if (ac.signal.aborted) return;
    return this.retry("stream ended");
  }

  /** Handles one parsed event; exposed for tests. */
  dispatch(ev: SseEvent): void {
    if (ev.event === "error") {
      // A problem document after the stream started; the stream ends after it.
      try {
        const p = JSON.parse(ev.data) as { detail?: string; title?: string };
        this.lastError = p.detail ?? p.title ?? ev.data;
      } catch {
        this.lastError = ev.data;
      }
      return;
    }
    let msg: WatchEventsResponse | undefined;
    try {
      msg = decodeWatchEvent(ev);
    } catch {
      msg = undefined;
    }
    if (ev.id !== undefined && ev.id !== "") this.lastEventId = ev.id;
    this.attempt = 0;
    if (!msg) return;
    if (msg.item.case === "change" && ev.id === undefined) {
      this.lastEventId = msg.item.value.revision.toString();
    } else if (msg.item.case === "bookmark" && ev.id === undefined) {
      this.lastEventId = msg.item.value.revision.toString();
    } else if (msg.item.case === "reset") {
      // The server cannot resume from our revision: start over and re-list.
      this.lastEventId = undefined;
    }
    this.o.onEvent(msg);
  }

  private retry(why: string): void {
    if (this.stopped) return;
    const reason = this.lastError ? `${why}: ${this.lastError}` : why;
    this.lastError = undefined;
    const delay = backoffDelay(this.attempt, this.o.random);
    this.attempt++;
    this.o.onStatus(this.attempt > this.o.offlineAfter ? "offline" : "reconnecting", `${reason}; retrying in ${Math.round(delay / 1000)} s`);
    this.timer = this.o.setTimeout(() => {
      this.timer = undefined;
      if (!this.stopped) void this.connect();
    }, delay);
  }
}
