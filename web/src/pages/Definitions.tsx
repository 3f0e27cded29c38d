// Definitions: list, versions, create (form or YAML file), validate a lab
// YAML, sync, deprecate, delete.

import { useState } from "preact/hooks";
import { parse as parseYaml } from "yaml";
import { fromJson, toJson, type JsonValue } from "@bufbuild/protobuf";
import { DefinitionStatus, FindingSeverity, LabletDefinitionSchema, PortProtocol, type LabletDefinition, type ValidateDefinitionResponse, type ValidationFinding } from "../gen/ccm/v1/definition_pb";
import { LicenseType } from "../gen/ccm/v1/common_pb";
import { ApiError } from "../api/errors";
import { can } from "../api/session";
import { DefinitionService, InstanceService, api, listAll } from "../api/services";
import { durationSeconds, enumLabel, fmtSeconds, fmtTime } from "../lib/format";
import { ActionButton, Badge, Card, Empty, EnumSelect, ErrorBox, Gate, KV, Modal, Spinner, toast } from "../ui/kit";
import { navigate, useAsync, useSession } from "../ui/hooks";

function statusTone(s: DefinitionStatus) {
  return s === DefinitionStatus.ACTIVE ? "ok" : s === DefinitionStatus.DEPRECATED ? "warn" : "muted";
}

function Findings({ findings }: { findings: ValidationFinding[] }) {
  if (findings.length === 0) return <p class="muted">No findings.</p>;
  return (
    <ul class="list small" data-testid="findings">
      {findings.map((f, n) => (
        <li key={n}>
          <Badge tone={f.severity === FindingSeverity.ERROR ? "bad" : f.severity === FindingSeverity.WARNING ? "warn" : "info"}>{enumLabel(FindingSeverity, f.severity)}</Badge> <code>{f.code}</code> {f.path && <span class="muted">{f.path}</span>} {f.message}
        </li>
      ))}
    </ul>
  );
}

/** Reads a YAML (or JSON) definition document into a LabletDefinition (proto or JSON field names). */
export function definitionFromYaml(text: string): LabletDefinition {
  const doc: unknown = parseYaml(text);
  if (!doc || typeof doc !== "object" || Array.isArray(doc)) throw new Error("the file must hold one mapping (a definition)");
  const o = doc as Record<string, unknown>;
  const body = (o.definition && typeof o.definition === "object" ? o.definition : o) as JsonValue;
  return fromJson(LabletDefinitionSchema, body, { ignoreUnknownFields: false });
}

function CreateDefinition({ onClose, onCreated }: { onClose: () => void; onCreated: (d: LabletDefinition) => void }) {
  const [text, setText] = useState(
    "name: my-lab\nversion: 1.0.0\ndescription: ''\nlabArtifactUri: file:///path/to/lab.yaml\nnodeCount: 2\nmaxDuration: 5400s\nlicenseAffinity: [LICENSE_TYPE_PERSONAL, LICENSE_TYPE_ENTERPRISE]\nresourceRequirements:\n  cpuCores: 4\n  memoryGb: 8\n  storageGb: 20\nportTemplate:\n  ports:\n    - { name: serial_1, protocol: PORT_PROTOCOL_TCP }\n",
  );
  const [parseErr, setParseErr] = useState("");
  const [err, setErr] = useState<ApiError | undefined>();
  const [findings, setFindings] = useState<ValidationFinding[]>([]);
  const [busy, setBusy] = useState(false);
  const submit = async () => {
    setErr(undefined);
    setParseErr("");
    let def: LabletDefinition;
    try {
      def = definitionFromYaml(text);
    } catch (e) {
      setParseErr(e instanceof Error ? e.message : String(e));
      return;
    }
    setBusy(true);
    try {
      const r = await api.call(DefinitionService.method.createDefinition, { definition: def, requestId: crypto.randomUUID() });
      setFindings(r.findings);
      if (r.definition) {
        toast(`Definition ${r.definition.name} ${r.definition.version} created`);
        onCreated(r.definition);
      }
    } catch (e) {
      setErr(e instanceof ApiError ? e : new ApiError(0, "Error", String(e)));
    } finally {
      setBusy(false);
    }
  };
  return (
    <Modal
      wide
      title="New definition"
      onClose={onClose}
      footer={
        <>
          <button class="btn btn-ghost" onClick={onClose}>
            Cancel
          </button>
          <button class="btn btn-primary" disabled={busy} onClick={() => void submit()}>
            {busy ? "Creating…" : "Create"}
          </button>
        </>
      }
    >
      <p class="small muted">
        A definition document in YAML (or JSON) with the fields of <code>ccm.v1.LabletDefinition</code> (lowerCamelCase or snake_case; enums by name; durations like <code>5400s</code>). Load a file or edit below.
      </p>
      <input
        type="file"
        accept=".yaml,.yml,.json"
        aria-label="Definition file"
        onChange={(e) => {
          const f = e.currentTarget.files?.[0];
          if (f) void f.text().then(setText);
        }}
      />
      <textarea class="code" rows={16} value={text} onInput={(e) => setText(e.currentTarget.value)} aria-label="Definition YAML" />
      {parseErr && (
        <div class="error-box" role="alert">
          <strong>Cannot read the document:</strong> {parseErr}
        </div>
      )}
      <ErrorBox error={err} />
      {findings.length > 0 && <Findings findings={findings} />}
    </Modal>
  );
}

function Validate({ def }: { def?: LabletDefinition }) {
  const [yaml, setYaml] = useState("");
  const [res, setRes] = useState<ValidateDefinitionResponse | undefined>();
  const [err, setErr] = useState<ApiError | undefined>();
  const [busy, setBusy] = useState(false);
  const run = async () => {
    setBusy(true);
    setErr(undefined);
    try {
      const source = yaml ? { case: "labYaml" as const, value: yaml } : { case: "labArtifactUri" as const, value: def?.labArtifactUri ?? "" };
      setRes(await api.call(DefinitionService.method.validateDefinition, { source, ...(def?.portTemplate ? { portTemplate: def.portTemplate } : {}), nodeCount: def?.nodeCount ?? 0, licenseAffinity: def?.licenseAffinity ?? [] }));
    } catch (e) {
      setErr(e instanceof ApiError ? e : new ApiError(0, "Error", String(e)));
    } finally {
      setBusy(false);
    }
  };
  return (
    <div>
      <p class="small muted">Lint a CML lab YAML against {def ? "this definition's port template and node count" : "an empty port template"}; nothing is stored. Without a file, the definition's artifact is fetched.</p>
      <div class="inline-form">
        <input
          type="file"
          accept=".yaml,.yml"
          aria-label="Lab YAML file"
          onChange={(e) => {
            const f = e.currentTarget.files?.[0];
            if (f) void f.text().then(setYaml);
          }}
        />
        <button class="btn" disabled={busy || (!yaml && !def)} onClick={() => void run()}>
          {busy ? "Validating…" : "Validate"}
        </button>
      </div>
      <ErrorBox error={err} />
      {res && (
        <div data-testid="validation">
          <p>
            {res.valid ? <Badge tone="ok">valid</Badge> : <Badge tone="bad">invalid</Badge>} {res.detectedNodeCount} nodes · placeholders {res.placeholders.join(", ") || "none"} · <code>{res.labYamlHash}</code>
          </p>
          <Findings findings={res.findings} />
        </div>
      )}
    </div>
  );
}

function Detail({ id, onChanged }: { id: string; onChanged: () => void }) {
  const session = useSession();
  const versions = useAsync((signal) => api.call(DefinitionService.method.listDefinitionVersions, { definitionId: id, pageSize: 100, includeDeleted: true }, { signal }), [id]);
  const [showYaml, setShowYaml] = useState(false);
  const yaml = useAsync(async (signal) => (showYaml ? (await api.call(DefinitionService.method.getDefinition, { definitionId: id, includeLabYaml: true }, { signal })).definition?.labYaml ?? "" : ""), [id, showYaml]);
  if (versions.error) return <ErrorBox error={versions.error} onRetry={versions.reload} />;
  if (!versions.data) return <Spinner />;
  const list = versions.data.definitions;
  const latest = list.find((d) => d.status === DefinitionStatus.ACTIVE) ?? list[0];
  if (!latest) return <Empty>No versions.</Empty>;
  const after = () => {
    versions.reload();
    onChanged();
  };
  return (
    <Card
      title={
        <>
          {latest.name} <Badge tone={statusTone(latest.status)}>{enumLabel(DefinitionStatus, latest.status)}</Badge>
        </>
      }
      actions={
        <span class="actions">
          {can(session, InstanceService.method.createInstance) && latest.status === DefinitionStatus.ACTIVE && (
            <button class="btn btn-primary btn-small" onClick={() => navigate(`/instances?create=1&definition=${id}`)}>
              Book
            </button>
          )}
          <Gate method={DefinitionService.method.syncDefinition}>
            <ActionButton
              small
              label="Sync"
              run={async () => {
                const r = await api.call(DefinitionService.method.syncDefinition, { definitionId: id });
                toast(r.changed ? `New version ${r.definition?.version ?? ""} (was ${r.previousVersion})` : "Artifact unchanged", r.changed ? "ok" : "info");
                after();
              }}
              done="Synced"
            />
          </Gate>
          <Gate method={DefinitionService.method.deprecateDefinition}>
            <ActionButton small label="Deprecate" askReason confirm="Deprecate every version? New bookings are refused; running instances continue." run={async (reason) => { await api.call(DefinitionService.method.deprecateDefinition, { definitionId: id, reason }); after(); }} done="Deprecated" />
          </Gate>
          <Gate method={DefinitionService.method.deleteDefinition}>
            <ActionButton small danger label="Delete" askReason confirm="Delete every version of this definition?" run={async (reason) => { await api.call(DefinitionService.method.deleteDefinition, { definitionId: id, reason }); after(); }} done="Deleted" />
          </Gate>
        </span>
      }
    >
      <p>{latest.description}</p>
      <KV
        rows={[
          ["Lineage id", <code>{latest.id}</code>],
          ["Artifact", <code>{latest.labArtifactUri}</code>],
          ["Hash", <code class="small">{latest.labYamlHash}</code>],
          ["Nodes", latest.nodeCount],
          ["Requirements", `${latest.resourceRequirements?.cpuCores ?? 0} CPU · ${latest.resourceRequirements?.memoryGb ?? 0} GiB · ${latest.resourceRequirements?.storageGb ?? 0} GiB${latest.resourceRequirements?.nestedVirt ? " · nested virt" : ""}`],
          ["AMI", latest.resourceRequirements?.amiRequirements.map((a) => `${a.namePattern} ≥ ${a.minVersion}`).join(", ")],
          ["Licences", latest.licenseAffinity.map((l) => enumLabel(LicenseType, l)).join(", ")],
          ["Ports", latest.portTemplate?.ports.map((p) => `${p.name}/${enumLabel(PortProtocol, p.protocol)}`).join(", ")],
          ["Max duration", fmtSeconds(durationSeconds(latest.maxDuration))],
          ["Grading rules", latest.gradingRulesUri],
        ]}
      />
      <h4>Versions</h4>
      <table class="table compact" data-testid="versions">
        <thead>
          <tr>
            <th>Version</th>
            <th>Status</th>
            <th>Hash</th>
            <th>Created</th>
          </tr>
        </thead>
        <tbody>
          {list.map((d) => (
            <tr key={d.version}>
              <td>{d.version}</td>
              <td>
                <Badge tone={statusTone(d.status)}>{enumLabel(DefinitionStatus, d.status)}</Badge> <span class="muted small">{d.statusReason}</span>
              </td>
              <td class="small">
                <code>{d.labYamlHash.slice(0, 19)}</code>
              </td>
              <td class="small">
                {fmtTime(d.createdAt)} {d.createdBy}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      <details onToggle={(e) => setShowYaml((e.currentTarget as HTMLDetailsElement).open)}>
        <summary>Lab YAML</summary>
        {yaml.loading ? <Spinner /> : yaml.error ? <ErrorBox error={yaml.error} /> : <pre class="code">{yaml.data}</pre>}
      </details>
      <Gate method={DefinitionService.method.validateDefinition}>
        <details>
          <summary>Validate a lab YAML against this definition</summary>
          <Validate def={latest} />
        </details>
      </Gate>
      <details>
        <summary>As JSON</summary>
        <pre class="code">{JSON.stringify(toJson(LabletDefinitionSchema, latest), null, 2)}</pre>
      </details>
    </Card>
  );
}

export function DefinitionsPage({ selected }: { selected: string }) {
  const [status, setStatus] = useState<number>(DefinitionStatus.ACTIVE);
  const [license, setLicense] = useState(0);
  const [q, setQ] = useState("");
  const [creating, setCreating] = useState(false);
  const [validating, setValidating] = useState(false);
  const defs = useAsync(
    (signal) =>
      listAll(async (pageToken) => {
        const r = await api.call(DefinitionService.method.listDefinitions, { pageSize: 500, pageToken, statuses: status ? [status] : [], nameContains: q, licenseType: license }, { signal });
        return { items: r.definitions, next: r.nextPageToken };
      }),
    [status, q, license],
  );
  return (
    <div class="page" data-testid="page-definitions">
      <div class="page-head">
        <h1>Definitions</h1>
        <div class="page-actions">
          <Gate method={DefinitionService.method.createDefinition}>
            <button class="btn btn-primary" onClick={() => setCreating(true)}>
              New definition
            </button>
          </Gate>
          <Gate method={DefinitionService.method.validateDefinition}>
            <button class="btn" onClick={() => setValidating(true)}>
              Validate a lab YAML
            </button>
          </Gate>
        </div>
      </div>
      {creating && <CreateDefinition onClose={() => setCreating(false)} onCreated={(d) => { setCreating(false); defs.reload(); navigate(`/definitions/${d.id}`); }} />}
      {validating && (
        <Modal title="Validate a lab YAML" onClose={() => setValidating(false)} wide>
          <Validate />
        </Modal>
      )}
      <div class="split">
        <Card>
          <div class="filters">
            <input type="search" placeholder="Name contains" value={q} onInput={(e) => setQ(e.currentTarget.value)} aria-label="Search definitions" />
            <EnumSelect e={DefinitionStatus} value={status} onChange={setStatus} anyLabel="Any status" aria-label="Status" />
            <EnumSelect e={LicenseType} value={license} onChange={setLicense} anyLabel="Any licence" aria-label="Licence" />
          </div>
          <ErrorBox error={defs.error} onRetry={defs.reload} />
          {!defs.data ? (
            <Spinner />
          ) : defs.data.length === 0 ? (
            <Empty>No definition matches.</Empty>
          ) : (
            <ul class="list selectable" data-testid="definitions-list">
              {defs.data.map((d) => (
                <li key={`${d.id}:${d.version}`} class={d.id === selected ? "selected" : ""}>
                  <a href={`#/definitions/${d.id}`}>
                    {d.name} <span class="muted small">{d.version}</span>
                  </a>{" "}
                  <Badge tone={statusTone(d.status)}>{enumLabel(DefinitionStatus, d.status)}</Badge>
                  <div class="muted small">
                    {d.nodeCount} nodes · {d.resourceRequirements?.cpuCores ?? 0} CPU · {d.resourceRequirements?.memoryGb ?? 0} GiB · {fmtSeconds(durationSeconds(d.maxDuration))}
                  </div>
                </li>
              ))}
            </ul>
          )}
        </Card>
        <div>{selected ? <Detail id={selected} onChanged={defs.reload} /> : <Empty>Choose a definition.</Empty>}</div>
      </div>
    </div>
  );
}
