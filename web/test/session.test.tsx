import { describe, expect, it } from "vitest";
import { renderToString } from "preact-render-to-string";
import { can, parseSession, rolesFor, type Session } from "../src/api/session";
import { DefinitionService, EventService, InstanceService, WorkerService } from "../src/api/services";
import { SessionContext } from "../src/ui/hooks";
import { WorkerActions } from "../src/pages/Workers";
import { InstanceActions } from "../src/pages/Instances";
import { create } from "@bufbuild/protobuf";
import { CmlWorkerSchema, WorkerState } from "../src/gen/ccm/v1/worker_pb";
import { InstanceState, LabletInstanceSchema } from "../src/gen/ccm/v1/instance_pb";

const s = (roles: string[], subject = "alice"): Session => ({ authenticated: true, user: subject, subject, roles, expiresAt: undefined, via: "session" });

describe("roles from the (ccm.v1.authz) option of the generated descriptors", () => {
  it("reads the contract's role lists", () => {
    expect(rolesFor(WorkerService.method.drainWorker)).toEqual(["admin"]);
    expect(rolesFor(WorkerService.method.listWorkers)).toEqual(["admin", "manager", "user", "viewer", "service"]);
    expect(rolesFor(DefinitionService.method.syncDefinition)).toEqual(["admin", "manager"]);
    expect(rolesFor(EventService.method.ingestEvent)).toEqual(["admin", "assessment"]);
  });

  it("gates fleet actions to admins", () => {
    expect(can(s(["admin"]), WorkerService.method.drainWorker)).toBe(true);
    expect(can(s(["manager"]), WorkerService.method.drainWorker)).toBe(false);
    expect(can(s(["viewer"]), WorkerService.method.drainWorker)).toBe(false);
    expect(can(s(["viewer"]), WorkerService.method.listWorkers)).toBe(true);
    expect(can(undefined, WorkerService.method.listWorkers)).toBe(false);
  });

  it("lets users act on their own instances only; managers on everyone's", () => {
    const m = InstanceService.method.terminateInstance;
    expect(can(s(["user"], "alice"), m, "alice")).toBe(true);
    expect(can(s(["user"], "alice"), m, "bob")).toBe(false);
    expect(can(s(["manager"], "carol"), m, "bob")).toBe(true);
    expect(can(s(["viewer"], "alice"), m, "alice")).toBe(false);
    expect(can(s(["user"], ""), m, "")).toBe(false);
  });
});

describe("parseSession", () => {
  it("reads the gateway's /auth/session answer", () => {
    const x = parseSession({ authenticated: true, via: "session", subject: "u-123", username: "alice", roles: ["Admin", "viewer", 3], expiresAt: 1900000000 });
    expect(x).toEqual({ authenticated: true, via: "session", subject: "u-123", user: "alice", roles: ["admin", "viewer"], expiresAt: new Date(1900000000 * 1000) });
  });
  it("accepts a user object and RFC 3339 expiry, and tolerates junk", () => {
    expect(parseSession({ authenticated: true, user: { sub: "s1", name: "Bob" }, roles: ["user"], expires_at: "2030-01-01T00:00:00Z" })).toMatchObject({ user: "Bob", subject: "s1", expiresAt: new Date("2030-01-01T00:00:00Z") });
    expect(parseSession(null)).toMatchObject({ authenticated: false, roles: [], user: "anonymous" });
  });
});

describe("role-gated controls render", () => {
  const running = create(CmlWorkerSchema, { id: "w1", name: "cml-1", state: WorkerState.RUNNING });
  const draining = create(CmlWorkerSchema, { id: "w1", name: "cml-1", state: WorkerState.DRAINING });
  const render = (session: Session, el: preact.VNode) => renderToString(<SessionContext.Provider value={session}>{el}</SessionContext.Provider>);

  it("shows a viewer no worker action at all", () => {
    const html = render(s(["viewer"]), <WorkerActions w={running} />);
    expect(html).not.toContain("<button");
  });

  it("shows an admin the actions the worker's state allows", () => {
    const html = render(s(["admin"]), <WorkerActions w={running} />);
    expect(html).toContain('data-testid="drain"');
    expect(html).toContain('data-testid="stop"');
    expect(html).toContain('data-testid="terminate"');
    expect(html).not.toContain('data-testid="cancel-drain"');
    expect(html).not.toContain('data-testid="start"');
    const d = render(s(["admin"]), <WorkerActions w={draining} />);
    expect(d).toContain('data-testid="cancel-drain"');
    expect(d).not.toContain('data-testid="drain"');
  });

  it("shows a user the actions on their own instance only", () => {
    const mine = create(LabletInstanceSchema, { id: "i1", ownerId: "alice", state: InstanceState.RUNNING });
    const theirs = create(LabletInstanceSchema, { id: "i2", ownerId: "bob", state: InstanceState.RUNNING });
    expect(render(s(["user"], "alice"), <InstanceActions i={mine} />)).toContain("Terminate");
    expect(render(s(["user"], "alice"), <InstanceActions i={theirs} />)).not.toContain("<button");
    expect(render(s(["viewer"], "alice"), <InstanceActions i={mine} />)).not.toContain("<button");
  });
});
