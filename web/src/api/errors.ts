// Typed API errors: every failed call becomes an ApiError built from the
// gateway's application/problem+json answer (RFC 9457) with its field
// violations (google.rpc.BadRequest, relayed by the gateway).

/** One invalid field of a request, as the server reported it. */
export interface FieldViolation {
  /** Field path as the server names it, e.g. "time_slot.end" or "timeSlot.end". */
  field: string;
  /** What is wrong with it. */
  description: string;
  /** Machine-readable reason, when given. */
  reason?: string;
}

/** Categories the UI reacts to differently. */
export type ErrorKind =
  | "unauthenticated" // 401: the session is gone; log in again
  | "forbidden" // 403: the role does not allow it
  | "not_found" // 404
  | "invalid" // 400 with violations
  | "conflict" // 409: stale resource_version / already exists / illegal transition
  | "precondition" // 412 / FAILED_PRECONDITION
  | "exhausted" // 429: quota / ports
  | "unavailable" // 502/503/504: a service is down or not leading
  | "network" // no answer at all
  | "server"; // anything else

/** An API call that failed. */
export class ApiError extends Error {
  override name = "ApiError";
  constructor(
    /** HTTP status; 0 when the request never got an answer. */
    readonly status: number,
    /** Short title (problem+json `title`). */
    readonly title: string,
    /** Human-readable detail (problem+json `detail`). */
    readonly detail: string,
    /** Field violations for bad input. */
    readonly violations: FieldViolation[] = [],
    /** gRPC status code name when the gateway reports it, e.g. "FAILED_PRECONDITION". */
    readonly code?: string,
    /** Request id for support, when the gateway reports one. */
    readonly requestId?: string,
    /** Failed preconditions (google.rpc.PreconditionFailure), as text. */
    readonly preconditions: string[] = [],
    /** Seconds to wait before retrying (google.rpc.RetryInfo), when given. */
    readonly retryAfterSeconds?: number,
  ) {
    super(detail || title);
  }

  /** The category of the error. */
  get kind(): ErrorKind {
    if (this.status === 0) return "network";
    if (this.status === 401) return "unauthenticated";
    if (this.status === 403) return "forbidden";
    if (this.status === 404) return "not_found";
    if (this.status === 409) return "conflict";
    if (this.status === 412 || this.code === "FAILED_PRECONDITION") return "precondition";
    if (this.status === 429) return "exhausted";
    if (this.status === 400 || this.status === 422) return "invalid";
    if (this.status === 502 || this.status === 503 || this.status === 504) return "unavailable";
    return "server";
  }

  /** The violation of one field, matched on snake_case or lowerCamelCase paths. */
  violationFor(field: string): FieldViolation | undefined {
    const norm = (s: string) => s.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase()).replace(/^\w+\./, (m) => m);
    const want = norm(field);
    return this.violations.find((v) => norm(v.field) === want || norm(v.field).endsWith(`.${want}`));
  }

  /** A one-paragraph message for a toast or error box. */
  describe(): string {
    const head = kindMessage(this.kind);
    const body = this.detail || this.title;
    const v = this.violations.map((x) => `${x.field}: ${x.description}`).join("; ");
    const p = this.preconditions.join("; ");
    const r = this.retryAfterSeconds !== undefined ? `retry in ${this.retryAfterSeconds} s` : "";
    return [head, body, v, p, r].filter((s) => s).join(" — ");
  }
}

function kindMessage(kind: ErrorKind): string {
  switch (kind) {
    case "unauthenticated":
      return "Your session has ended";
    case "forbidden":
      return "Not allowed for your role";
    case "not_found":
      return "Not found";
    case "invalid":
      return "Invalid input";
    case "conflict":
      return "Conflict";
    case "precondition":
      return "Not possible in the current state";
    case "exhausted":
      return "Out of capacity or quota";
    case "unavailable":
      return "Service unavailable";
    case "network":
      return "Cannot reach the server";
    case "server":
      return "Server error";
  }
}

function str(v: unknown): string | undefined {
  return typeof v === "string" ? v : typeof v === "number" ? String(v) : undefined;
}

function parseViolations(raw: unknown): FieldViolation[] {
  if (!Array.isArray(raw)) return [];
  const out: FieldViolation[] = [];
  for (const item of raw) {
    if (item === null || typeof item !== "object") continue;
    const o = item as Record<string, unknown>;
    const field = str(o.field) ?? str(o.name) ?? str(o.pointer) ?? "";
    const description = str(o.description) ?? str(o.message) ?? str(o.detail) ?? str(o.reason) ?? "";
    const reason = str(o.reason);
    out.push(reason !== undefined ? { field, description, reason } : { field, description });
  }
  return out;
}

/**
 * Builds an ApiError from a failed response's status, content type and body
 * text. Accepts problem+json, plain JSON with a message, or any text.
 */
export function errorFromResponse(status: number, statusText: string, contentType: string | null, bodyText: string, requestId?: string | null): ApiError {
  const rid = requestId ?? undefined;
  let parsed: unknown;
  if (contentType && /json/i.test(contentType) && bodyText) {
    try {
      parsed = JSON.parse(bodyText);
    } catch {
      parsed = undefined;
    }
  }
  if (parsed !== null && typeof parsed === "object" && !Array.isArray(parsed)) {
    const o = parsed as Record<string, unknown>;
    const title = str(o.title) ?? statusText ?? `HTTP ${status}`;
    const detail = str(o.detail) ?? str(o.message) ?? str(o.error) ?? "";
    let violations = parseViolations(o.fieldViolations ?? o.violations ?? o.field_violations ?? o.errors);
    if (violations.length === 0 && Array.isArray(o.details)) {
      // A google.rpc.Status-like body: look for BadRequest details.
      for (const d of o.details as unknown[]) {
        if (d && typeof d === "object") {
          violations = violations.concat(parseViolations((d as Record<string, unknown>).fieldViolations));
        }
      }
    }
    const code = str(o.grpcStatus) ?? str(o.grpc_status) ?? str(o.code);
    const preconditions: string[] = [];
    const pf = o.preconditionFailures ?? o.precondition_failures;
    if (Array.isArray(pf)) {
      for (const x of pf) {
        if (x && typeof x === "object") {
          const xo = x as Record<string, unknown>;
          preconditions.push([str(xo.subject), str(xo.description)].filter(Boolean).join(": "));
        }
      }
    }
    const ra = o.retryAfterSeconds ?? o.retry_after_seconds;
    return new ApiError(status, title, detail, violations, code, str(o.requestId) ?? str(o.request_id) ?? rid, preconditions, typeof ra === "number" ? ra : undefined);
  }
  const text = bodyText.trim().slice(0, 500);
  return new ApiError(status, statusText || `HTTP ${status}`, text, [], undefined, rid);
}
