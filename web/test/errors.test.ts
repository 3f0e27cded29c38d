import { describe, expect, it } from "vitest";
import { ApiError, errorFromResponse } from "../src/api/errors";

describe("errorFromResponse", () => {
  it("maps the gateway's problem document with field violations", () => {
    const body = JSON.stringify({
      type: "urn:ccm:problem:invalid-argument",
      title: "Bad Request",
      status: 400,
      detail: "the definition is invalid",
      grpcStatus: "INVALID_ARGUMENT",
      requestId: "req-1",
      fieldViolations: [
        { field: "definition.name", description: "must not be empty" },
        { field: "time_slot.end", description: "after the max duration", reason: "TOO_LONG" },
      ],
    });
    const e = errorFromResponse(400, "Bad Request", "application/problem+json", body);
    expect(e).toBeInstanceOf(ApiError);
    expect(e.kind).toBe("invalid");
    expect(e.code).toBe("INVALID_ARGUMENT");
    expect(e.requestId).toBe("req-1");
    expect(e.violations).toHaveLength(2);
    expect(e.violationFor("definition.name")?.description).toBe("must not be empty");
    // snake_case and lowerCamelCase paths find the same violation
    expect(e.violationFor("timeSlot.end")?.reason).toBe("TOO_LONG");
    expect(e.violationFor("time_slot.end")?.reason).toBe("TOO_LONG");
    expect(e.violationFor("owner_id")).toBeUndefined();
    expect(e.describe()).toContain("definition.name: must not be empty");
  });

  it("treats FAILED_PRECONDITION (HTTP 400) as a state problem, not bad input", () => {
    const e = errorFromResponse(400, "Bad Request", "application/problem+json", JSON.stringify({ title: "Bad Request", status: 400, detail: "worker is not RUNNING", grpcStatus: "FAILED_PRECONDITION", preconditionFailures: [{ type: "STATE", subject: "worker/w1", description: "state is STOPPED" }] }));
    expect(e.kind).toBe("precondition");
    expect(e.preconditions).toEqual(["worker/w1: state is STOPPED"]);
    expect(e.describe()).toContain("Not possible in the current state");
  });

  it.each([
    [401, "unauthenticated"],
    [403, "forbidden"],
    [404, "not_found"],
    [409, "conflict"],
    [429, "exhausted"],
    [503, "unavailable"],
    [500, "server"],
  ] as const)("maps HTTP %i to %s", (status, kind) => {
    expect(errorFromResponse(status, "x", "application/problem+json", JSON.stringify({ title: "x", detail: "d" })).kind).toBe(kind);
  });

  it("keeps a plain-text body and the x-request-id header", () => {
    const e = errorFromResponse(502, "Bad Gateway", "text/html", "<h1>upstream down</h1>", "rid-9");
    expect(e.kind).toBe("unavailable");
    expect(e.detail).toBe("<h1>upstream down</h1>");
    expect(e.requestId).toBe("rid-9");
  });

  it("survives a JSON content type with a body that is not JSON", () => {
    const e = errorFromResponse(500, "Internal Server Error", "application/json", "{not json");
    expect(e.kind).toBe("server");
    expect(e.detail).toBe("{not json");
  });

  it("reads retry-after and reports it", () => {
    const e = errorFromResponse(429, "Too Many Requests", "application/problem+json", JSON.stringify({ title: "Too Many Requests", detail: "rate limited", retryAfterSeconds: 7 }));
    expect(e.retryAfterSeconds).toBe(7);
    expect(e.describe()).toContain("retry in 7 s");
  });

  it("network errors have status 0", () => {
    expect(new ApiError(0, "Network error", "refused").kind).toBe("network");
  });
});
