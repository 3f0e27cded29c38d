// Turns a generated RPC descriptor plus a request message into the HTTP request
// the gateway expects, using the `google.api.http` rule declared on the RPC in
// proto/ccm/v1 — the same rule the gateway transcodes with. No URL is written
// by hand anywhere in the UI.

import { getOption, hasOption, toJson, type DescField, type DescMessage, type DescMethod, type JsonObject, type JsonValue, type Message } from "@bufbuild/protobuf";
import { http } from "../gen/google/api/annotations_pb";

/** An HTTP request derived from an RPC's http rule. */
export interface HttpCall {
  method: "GET" | "POST" | "PUT" | "PATCH" | "DELETE";
  /** Path with the bound fields substituted and the query string appended. */
  url: string;
  /** JSON body, or undefined when the rule has no body. */
  body: JsonValue | undefined;
}

/** The verb and path template of an RPC's primary binding, plus its body spec. */
export interface HttpBinding {
  method: HttpCall["method"];
  template: string;
  body: string;
}

/** Thrown when an RPC has no usable http rule (a contract bug). */
export class TranscodeError extends Error {
  override name = "TranscodeError";
}

/** Reads the primary http binding of an RPC. */
export function bindingOf(method: DescMethod): HttpBinding {
  if (!hasOption(method, http)) {
    throw new TranscodeError(`${method.parent.typeName}.${method.name} has no google.api.http rule`);
  }
  const rule = getOption(method, http);
  const p = rule.pattern;
  switch (p.case) {
    case "get":
      return { method: "GET", template: p.value, body: rule.body };
    case "post":
      return { method: "POST", template: p.value, body: rule.body };
    case "put":
      return { method: "PUT", template: p.value, body: rule.body };
    case "patch":
      return { method: "PATCH", template: p.value, body: rule.body };
    case "delete":
      return { method: "DELETE", template: p.value, body: rule.body };
    default:
      throw new TranscodeError(`${method.parent.typeName}.${method.name}: unsupported http pattern ${String(p.case)}`);
  }
}

/** Field paths bound in a path template, e.g. ["worker_id"] or ["template.name"]. */
export function templateVariables(template: string): string[] {
  const vars: string[] = [];
  const re = /\{([a-zA-Z0-9_.]+)(=[^}]*)?\}/g;
  let m: RegExpExecArray | null;
  while ((m = re.exec(template)) !== null) vars.push(m[1]!);
  return vars;
}

function fieldByProtoName(schema: DescMessage, name: string): DescField {
  const f = schema.fields.find((x) => x.name === name);
  if (!f) throw new TranscodeError(`${schema.typeName} has no field ${name}`);
  return f;
}

/** Removes the value at a proto field path from a JSON object and returns it. */
function takePath(schema: DescMessage, json: JsonObject, path: string): JsonValue | undefined {
  const parts = path.split(".");
  let s: DescMessage | undefined = schema;
  let obj: JsonObject | undefined = json;
  for (let i = 0; i < parts.length; i++) {
    if (!s || !obj) return undefined;
    const f = fieldByProtoName(s, parts[i]!);
    if (i === parts.length - 1) {
      const v = obj[f.jsonName];
      delete obj[f.jsonName];
      return v;
    }
    const next: JsonValue | undefined = obj[f.jsonName];
    s = f.fieldKind === "message" ? f.message : undefined;
    obj = next !== null && typeof next === "object" && !Array.isArray(next) ? next : undefined;
  }
  return undefined;
}

/**
 * Flattens the JSON form of the unbound fields into query parameters:
 * nested messages become dotted paths, repeated fields repeat the key, and
 * names are the JSON (lowerCamelCase) names. Well-known types that are
 * scalars in JSON (Timestamp, Duration) are already strings here.
 */
export function toQuery(json: JsonObject, prefix = "", out: [string, string][] = []): [string, string][] {
  for (const [k, v] of Object.entries(json)) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (v === null || v === undefined) continue;
    if (Array.isArray(v)) {
      for (const item of v) {
        if (item !== null && typeof item === "object") {
          throw new TranscodeError(`repeated message field ${key} cannot be sent as a query parameter`);
        }
        out.push([key, String(item)]);
      }
    } else if (typeof v === "object") {
      toQuery(v, key, out);
    } else {
      out.push([key, String(v)]);
    }
  }
  return out;
}

/** Builds the HTTP request for an RPC call. */
export function transcode(method: DescMethod, request: Message): HttpCall {
  const b = bindingOf(method);
  const schema = method.input;
  // Canonical proto3 JSON (lowerCamelCase, enums as names, int64 as strings).
  const json = toJson(schema, request as never) as JsonObject;
  let path = b.template;
  for (const v of templateVariables(b.template)) {
    const value = takePath(schema, json, v);
    if (value === undefined || value === null || value === "") {
      throw new TranscodeError(`${method.name}: the path needs ${v}`);
    }
    path = path.replace(new RegExp(`\\{${v.replace(/\./g, "\\.")}(=[^}]*)?\\}`), encodeURIComponent(String(value)));
  }
  let body: JsonValue | undefined;
  let rest: JsonObject = json;
  if (b.body === "*") {
    body = json;
    rest = {};
  } else if (b.body !== "") {
    const f = fieldByProtoName(schema, b.body);
    body = json[f.jsonName] ?? {};
    rest = { ...json };
    delete rest[f.jsonName];
  }
  const q = toQuery(rest);
  const qs = q.map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`).join("&");
  return { method: b.method, url: qs ? `${path}?${qs}` : path, body };
}
