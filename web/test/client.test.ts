// The API client against a real loopback HTTP server.
import { afterEach, describe, expect, it } from "vitest";
import { ApiClient } from "../src/api/client";
import { ApiError } from "../src/api/errors";
import { InstanceService, WorkerService } from "../src/api/services";
import { WorkerState } from "../src/gen/ccm/v1/worker_pb";
import { InstanceState } from "../src/gen/ccm/v1/instance_pb";
import { json, serve } from "./helpers";

let close: (() => Promise<void>) | undefined;
afterEach(async () => {
  await close?.();
  close = undefined;
});

describe("ApiClient", () => {
  it("posts an action to its http rule path with the rest of the request as the body", async () => {
    const srv = await serve((_req, res) => json(res, 200, { worker: { id: "w1", name: "cml-1", state: "WORKER_STATE_DRAINING", resourceVersion: "7" } }));
    close = srv.close;
    const c = new ApiClient({ baseUrl: srv.base });
    const r = await c.call(WorkerService.method.drainWorker, { workerId: "w 1/x", reason: "maintenance" });
    expect(srv.seen[0]!.method).toBe("POST");
    expect(srv.seen[0]!.url).toBe("/v1/workers/w%201%2Fx:drain");
    expect(JSON.parse(srv.seen[0]!.body)).toEqual({ reason: "maintenance" });
    expect(srv.seen[0]!.headers["content-type"]).toBe("application/json");
    // the answer is parsed with the generated schema: enum names → numbers, int64 strings → bigint
    expect(r.worker?.state).toBe(WorkerState.DRAINING);
    expect(r.worker?.resourceVersion).toBe(7n);
  });

  it("sends list filters as query parameters (repeated enums by name)", async () => {
    const srv = await serve((_req, res) => json(res, 200, { instances: [{ id: "i1", state: "INSTANCE_STATE_PENDING" }], nextPageToken: "" }));
    close = srv.close;
    const c = new ApiClient({ baseUrl: srv.base });
    const r = await c.call(InstanceService.method.listInstances, { pageSize: 50, states: [InstanceState.PENDING, InstanceState.RUNNING], workerId: "w1" });
    expect(srv.seen[0]!.method).toBe("GET");
    const u = new URL(srv.seen[0]!.url, srv.base);
    expect(u.pathname).toBe("/v1/instances");
    expect(u.searchParams.getAll("states")).toEqual(["INSTANCE_STATE_PENDING", "INSTANCE_STATE_RUNNING"]);
    expect(u.searchParams.get("pageSize")).toBe("50");
    expect(u.searchParams.get("workerId")).toBe("w1");
    expect(srv.seen[0]!.body).toBe("");
    expect(r.instances[0]?.state).toBe(InstanceState.PENDING);
  });

  it("turns a problem document into a typed ApiError with field violations", async () => {
    const srv = await serve((_req, res) =>
      json(res, 400, { type: "urn:ccm:problem:invalid-argument", title: "Bad Request", status: 400, detail: "invalid booking", grpcStatus: "INVALID_ARGUMENT", fieldViolations: [{ field: "time_slot.end", description: "exceeds max_duration 90m" }] }, "application/problem+json"),
    );
    close = srv.close;
    const c = new ApiClient({ baseUrl: srv.base, onUnauthenticated: () => expect.fail("not a 401") });
    const err = await c.call(InstanceService.method.createInstance, { definitionId: "d1", timeSlot: { asap: true } }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ApiError);
    const e = err as ApiError;
    expect(e.status).toBe(400);
    expect(e.kind).toBe("invalid");
    expect(e.violationFor("timeSlot.end")?.description).toBe("exceeds max_duration 90m");
  });

  it("calls onUnauthenticated (the login redirect) on 401 and still throws", async () => {
    const srv = await serve((_req, res) => json(res, 401, { title: "Unauthorized", status: 401, detail: "session expired" }, "application/problem+json"));
    close = srv.close;
    let redirected = 0;
    const c = new ApiClient({ baseUrl: srv.base, onUnauthenticated: () => redirected++ });
    const e = (await c.call(WorkerService.method.listWorkers, {}).catch((x: unknown) => x)) as ApiError;
    expect(e.kind).toBe("unauthenticated");
    expect(redirected).toBe(1);
  });

  it("reports 403 without redirecting", async () => {
    const srv = await serve((_req, res) => json(res, 403, { title: "Forbidden", status: 403, detail: "requires one of: admin", grpcStatus: "PERMISSION_DENIED" }, "application/problem+json"));
    close = srv.close;
    let redirected = 0;
    const c = new ApiClient({ baseUrl: srv.base, onUnauthenticated: () => redirected++ });
    const e = (await c.call(WorkerService.method.drainWorker, { workerId: "w1" }).catch((x: unknown) => x)) as ApiError;
    expect(e.kind).toBe("forbidden");
    expect(e.code).toBe("PERMISSION_DENIED");
    expect(redirected).toBe(0);
  });

  it("reports an answer that breaks the contract instead of returning garbage", async () => {
    const srv = await serve((_req, res) => json(res, 200, { worker: { name: 42, instanceIds: "not-a-list" } }));
    close = srv.close;
    const c = new ApiClient({ baseUrl: srv.base });
    const e = (await c.call(WorkerService.method.getWorker, { workerId: "w1" }).catch((x: unknown) => x)) as ApiError;
    expect(e).toBeInstanceOf(ApiError);
    expect(e.detail).toContain("does not match the contract");
  });

  it("maps a refused connection to a network error", async () => {
    const srv = await serve(() => undefined);
    const base = srv.base;
    await srv.close();
    const c = new ApiClient({ baseUrl: base });
    const e = (await c.call(WorkerService.method.listWorkers, {}).catch((x: unknown) => x)) as ApiError;
    expect(e.kind).toBe("network");
  });

  it("refuses to call without the path field", async () => {
    const c = new ApiClient({ baseUrl: "http://127.0.0.1:9" });
    await expect(c.call(WorkerService.method.getWorker, { workerId: "" })).rejects.toThrow(/needs worker_id/);
  });
});
