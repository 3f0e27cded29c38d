// Worker templates: list, create from YAML, delete.

import { useState } from "preact/hooks";
import { parse as parseYaml } from "yaml";
import { fromJson, type JsonValue } from "@bufbuild/protobuf";
import { LicenseType } from "../gen/ccm/v1/common_pb";
import { WorkerTemplateSchema, type WorkerTemplate } from "../gen/ccm/v1/template_pb";
import { ApiError } from "../api/errors";
import { TemplateService, api } from "../api/services";
import { durationSeconds, enumLabel, fmtSeconds, fmtTime } from "../lib/format";
import { ActionButton, Badge, Card, Empty, ErrorBox, Gate, KV, Modal, Spinner, toast } from "../ui/kit";
import { useAsync } from "../ui/hooks";
import { capText } from "./common";

function CreateTemplate({ onClose, onCreated }: { onClose: () => void; onCreated: () => void }) {
  const [text, setText] = useState(
    "name: my-template\ninstanceType: m5zn.metal\nlicenseType: LICENSE_TYPE_ENTERPRISE\namiPattern: CML-2.9*\nregions: [us-east-1]\ncapacity: { cpuCores: 48, memoryGb: 192, storageGb: 500, maxNodes: 500 }\nstartupTime: 600s\ndrainTimeout: 3600s\nminWorkers: 0\nmaxWorkers: 4\n",
  );
  const [err, setErr] = useState<ApiError | Error | undefined>();
  const [busy, setBusy] = useState(false);
  const submit = async () => {
    setErr(undefined);
    let t: WorkerTemplate;
    try {
      const doc: unknown = parseYaml(text);
      t = fromJson(WorkerTemplateSchema, doc as JsonValue);
    } catch (e) {
      setErr(new Error(`Cannot read the document: ${e instanceof Error ? e.message : String(e)}`));
      return;
    }
    setBusy(true);
    try {
      await api.call(TemplateService.method.createTemplate, { template: t });
      toast(`Template ${t.name} created`);
      onCreated();
    } catch (e) {
      setErr(e instanceof ApiError ? e : new ApiError(0, "Error", String(e)));
    } finally {
      setBusy(false);
    }
  };
  return (
    <Modal
      wide
      title="New worker template"
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
        A <code>ccm.v1.WorkerTemplate</code> in YAML or JSON.
      </p>
      <input type="file" accept=".yaml,.yml,.json" aria-label="Template file" onChange={(e) => void e.currentTarget.files?.[0]?.text().then(setText)} />
      <textarea class="code" rows={14} value={text} onInput={(e) => setText(e.currentTarget.value)} aria-label="Template YAML" />
      <ErrorBox error={err} />
    </Modal>
  );
}

export function TemplatesPage() {
  const r = useAsync((signal) => api.call(TemplateService.method.listTemplates, { pageSize: 200 }, { signal }), []);
  const [creating, setCreating] = useState(false);
  return (
    <div class="page" data-testid="page-templates">
      <div class="page-head">
        <h1>Worker templates</h1>
        <div class="page-actions">
          <Gate method={TemplateService.method.createTemplate}>
            <button class="btn btn-primary" onClick={() => setCreating(true)}>
              New template
            </button>
          </Gate>
        </div>
      </div>
      {creating && <CreateTemplate onClose={() => setCreating(false)} onCreated={() => { setCreating(false); r.reload(); }} />}
      <ErrorBox error={r.error} onRetry={r.reload} />
      {!r.data ? (
        <Spinner />
      ) : r.data.templates.length === 0 ? (
        <Empty>No templates.</Empty>
      ) : (
        <div class="cards cards-wide">
          {r.data.templates.map((t) => (
            <Card
              key={t.name}
              title={
                <>
                  {t.name} {t.isSeeded && <Badge tone="muted">seeded</Badge>}
                </>
              }
              actions={
                <Gate method={TemplateService.method.deleteTemplate}>
                  <ActionButton small danger label="Delete" confirm={t.workerCount ? `${t.workerCount} worker(s) use ${t.name}; the server refuses to delete it while they exist.` : `Delete template ${t.name}?`} run={async () => { await api.call(TemplateService.method.deleteTemplate, { templateName: t.name, resourceVersion: t.resourceVersion }); r.reload(); }} done="Template deleted" />
                </Gate>
              }
            >
              <p class="small">{t.description}</p>
              <KV
                rows={[
                  ["Instance type", t.instanceType],
                  ["Licence", enumLabel(LicenseType, t.licenseType)],
                  ["Capacity", capText(t.capacity)],
                  ["AMI pattern", <code>{t.amiPattern}</code>],
                  ["Regions", t.regions.join(", ")],
                  ["Workers", `${t.workerCount} (min ${t.minWorkers}, max ${t.maxWorkers || "∞"})`],
                  ["Startup / drain timeout", `${fmtSeconds(durationSeconds(t.startupTime))} / ${fmtSeconds(durationSeconds(t.drainTimeout))}`],
                  ["Scale-up cooldown / stopped retention", `${fmtSeconds(durationSeconds(t.scaleUpCooldown))} / ${fmtSeconds(durationSeconds(t.stoppedRetention))}`],
                  ["Ports", t.portRange ? `${t.portRange.start}–${t.portRange.end}` : ""],
                  ["Volume", t.volumeSizeGb ? `${t.volumeSizeGb} GiB` : ""],
                  ["Tags", Object.entries(t.tags).map(([k, v]) => <Badge key={k} tone="muted">{`${k}=${v}`}</Badge>)],
                  ["Updated", fmtTime(t.updatedAt)],
                ]}
              />
            </Card>
          ))}
        </div>
      )}
    </div>
  );
}
