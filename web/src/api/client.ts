// The typed API client: one generic `call` for every public RPC. Requests are
// built from the generated request schema and the RPC's google.api.http rule,
// sent as canonical proto3 JSON, and answers are parsed back with the
// generated response schema (so a contract drift shows up as a parse error,
// not as `undefined` deep inside a page).

import { create, fromJson, type DescMethodUnary, type JsonValue, type MessageInitShape, type MessageJsonType, type MessageShape } from "@bufbuild/protobuf";
import { ApiError, errorFromResponse } from "./errors";
import { transcode } from "./transcode";

/** Where the login page lives (served by the gateway). */
export const LOGIN_PATH = "/auth/login";

/** Options of an ApiClient. */
export interface ClientOptions {
  /** Origin + prefix of the gateway; "" means same origin. */
  baseUrl?: string;
  /** fetch implementation (tests pass their own). */
  fetch?: typeof fetch;
  /** Called on 401; the default sends the browser to the login page. */
  onUnauthenticated?: () => void;
}

/** Per-call options. */
export interface CallOptions {
  signal?: AbortSignal;
}

/** The login URL that returns to the current page afterwards. */
export function loginUrl(returnTo: string): string {
  return `${LOGIN_PATH}?return_to=${encodeURIComponent(returnTo)}`;
}

function defaultUnauthenticated(): void {
  if (typeof window !== "undefined") {
    window.location.assign(loginUrl(window.location.pathname + window.location.search + window.location.hash));
  }
}

/** A client of the ccm gateway's HTTP/JSON API. */
export class ApiClient {
  private readonly base: string;
  private readonly fetchImpl: typeof fetch;
  private readonly onUnauthenticated: () => void;

  constructor(opts: ClientOptions = {}) {
    this.base = opts.baseUrl ?? "";
    this.fetchImpl = opts.fetch ?? ((input, init) => globalThis.fetch(input, init));
    this.onUnauthenticated = opts.onUnauthenticated ?? defaultUnauthenticated;
  }

  /** Calls a unary RPC through its HTTP binding. */
  async call<M extends DescMethodUnary>(method: M, request: MessageInitShape<M["input"]>, opts: CallOptions = {}): Promise<MessageShape<M["output"]>> {
    const msg = create(method.input, request);
    const req = transcode(method, msg);
    const json = (await this.raw(req.method, req.url, req.body, opts)) as MessageJsonType<M["output"]>;
    try {
      return fromJson(method.output, json as JsonValue, { ignoreUnknownFields: true }) as MessageShape<M["output"]>;
    } catch (e) {
      throw new ApiError(200, "Unexpected response", `${method.name}: the answer does not match the contract (${e instanceof Error ? e.message : String(e)})`);
    }
  }

  /** Sends a JSON request and returns the parsed JSON answer (or throws ApiError). */
  async raw(verb: string, url: string, body: JsonValue | undefined, opts: CallOptions = {}): Promise<JsonValue> {
    let res: Response;
    try {
      const init: RequestInit = {
        method: verb,
        headers: body === undefined ? { Accept: "application/json" } : { Accept: "application/json", "Content-Type": "application/json" },
        credentials: "same-origin",
      };
      if (body !== undefined) init.body = JSON.stringify(body);
      if (opts.signal) init.signal = opts.signal;
      res = await this.fetchImpl(this.base + url, init);
    } catch (e) {
      if (e instanceof DOMException && e.name === "AbortError") throw e;
      throw new ApiError(0, "Network error", e instanceof Error ? e.message : String(e));
    }
    const text = await res.text();
    if (!res.ok) {
      const err = errorFromResponse(res.status, res.statusText, res.headers.get("content-type"), text, res.headers.get("x-request-id"));
      if (res.status === 401) this.onUnauthenticated();
      throw err;
    }
    if (!text) return {};
    try {
      return JSON.parse(text) as JsonValue;
    } catch {
      throw new ApiError(res.status, "Unexpected response", `not JSON: ${text.slice(0, 200)}`);
    }
  }
}
