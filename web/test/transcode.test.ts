import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { bindingOf, templateVariables, toQuery, transcode } from "../src/api/transcode";
import { DefinitionService, EventService, InstanceService, TemplateService, WorkerService } from "../src/api/services";
import { CreateDefinitionRequestSchema } from "../src/gen/ccm/v1/definition_pb";
import { UpdateTemplateRequestSchema } from "../src/gen/ccm/v1/template_pb";
import { GetWorkerCapacityRequestSchema } from "../src/gen/ccm/v1/worker_pb";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";

describe("http rules from the descriptors", () => {
  it("reads verbs, templates and body specs declared in the protos", () => {
    expect(bindingOf(WorkerService.method.listWorkers)).toEqual({ method: "GET", template: "/v1/workers", body: "" });
    expect(bindingOf(WorkerService.method.cancelWorkerDrain)).toEqual({ method: "POST", template: "/v1/workers/{worker_id}:cancelDrain", body: "*" });
    expect(bindingOf(DefinitionService.method.createDefinition).body).toBe("definition");
    expect(bindingOf(WorkerService.method.updateWorkerTags).method).toBe("PUT");
    expect(bindingOf(TemplateService.method.updateTemplate).method).toBe("PATCH");
    expect(bindingOf(EventService.method.watchEvents).template).toBe("/v1/events:watch");
  });

  it("finds path variables, nested ones too", () => {
    expect(templateVariables("/v1/templates/{template.name}")).toEqual(["template.name"]);
    expect(templateVariables("/v1/workers/{worker_id}/labs/{lab_id}:control")).toEqual(["worker_id", "lab_id"]);
  });

  it("sends a named body field as the body and nothing else in it", () => {
    const req = create(CreateDefinitionRequestSchema, { definition: { name: "ospf", nodeCount: 2 }, requestId: "r1" });
    const call = transcode(DefinitionService.method.createDefinition, req);
    expect(call.method).toBe("POST");
    expect(call.body).toEqual({ name: "ospf", nodeCount: 2 });
    expect(call.url).toBe("/v1/definitions?requestId=r1");
  });

  it("binds a nested path field and removes it from the body", () => {
    const req = create(UpdateTemplateRequestSchema, { template: { name: "metal", maxWorkers: 4 }, updateMask: { paths: ["max_workers"] } });
    const call = transcode(TemplateService.method.updateTemplate, req);
    expect(call.url.startsWith("/v1/templates/metal")).toBe(true);
    expect(call.body).toEqual({ maxWorkers: 4 });
    expect(new URL(call.url, "http://x").searchParams.get("updateMask")).toBe("maxWorkers");
  });

  it("sends timestamps in the query as RFC 3339", () => {
    const req = create(GetWorkerCapacityRequestSchema, { workerId: "w1", windowStart: timestampFromDate(new Date("2030-01-02T03:04:05Z")) });
    const call = transcode(WorkerService.method.getWorkerCapacity, req);
    expect(call.url).toBe("/v1/workers/w1/capacity?windowStart=2030-01-02T03%3A04%3A05Z");
    expect(call.body).toBeUndefined();
  });

  it("flattens nested objects and repeats repeated keys", () => {
    expect(toQuery({ a: { b: 1, c: "x" }, r: ["p", "q"], n: null as never })).toEqual([
      ["a.b", "1"],
      ["a.c", "x"],
      ["r", "p"],
      ["r", "q"],
    ]);
    expect(() => toQuery({ r: [{ x: 1 }] })).toThrow(/repeated message/);
  });

  it("uses the primary binding of an RPC with additional bindings", () => {
    expect(bindingOf(InstanceService.method.terminateInstance)).toEqual({ method: "POST", template: "/v1/instances/{instance_id}:terminate", body: "*" });
  });
});
