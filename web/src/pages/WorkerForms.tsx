// Create / import worker dialogs (admin).

import { useState } from "preact/hooks";
import { ApiError } from "../api/errors";
import { TemplateService, WorkerService, api } from "../api/services";
import { store } from "../api/store";
import { ErrorBox, Field, Modal, toast } from "../ui/kit";
import { useAsync } from "../ui/hooks";

export function CreateWorkerButton() {
  const [open, setOpen] = useState(false);
  const [templateName, setTemplate] = useState("");
  const [name, setName] = useState("");
  const [region, setRegion] = useState("");
  const [amiId, setAmi] = useState("");
  const [busy, setBusy] = useState(false);
  const [err, setErr] = useState<ApiError | undefined>();
  const templates = useAsync(async (signal) => (open ? (await api.call(TemplateService.method.listTemplates, { pageSize: 200 }, { signal })).templates : []), [open]);
  const tpl = templates.data?.find((t) => t.name === templateName);
  const submit = async () => {
    setBusy(true);
    setErr(undefined);
    try {
      const r = await api.call(WorkerService.method.createWorker, { templateName, name, region, amiId, requestId: crypto.randomUUID() });
      store.putWorker(r.worker);
      toast(`Worker ${r.worker?.name ?? ""} created; the controller launches it`);
      setOpen(false);
    } catch (e) {
      setErr(e instanceof ApiError ? e : new ApiError(0, "Error", String(e)));
    } finally {
      setBusy(false);
    }
  };
  return (
    <>
      <button class="btn btn-primary" onClick={() => setOpen(true)}>
        New worker
      </button>
      {open && (
        <Modal
          title="New worker"
          onClose={() => setOpen(false)}
          footer={
            <>
              <button class="btn btn-ghost" onClick={() => setOpen(false)}>
                Cancel
              </button>
              <button class="btn btn-primary" disabled={busy || !templateName} onClick={() => void submit()}>
                {busy ? "Creating…" : "Create"}
              </button>
            </>
          }
        >
          <ErrorBox error={templates.error} />
          <Field label="Template" error={err?.violationFor("template_name")}>
            <select value={templateName} onChange={(e) => setTemplate(e.currentTarget.value)}>
              <option value="">Choose…</option>
              {(templates.data ?? []).map((t) => (
                <option key={t.name} value={t.name}>
                  {t.name} — {t.instanceType}
                </option>
              ))}
            </select>
          </Field>
          <Field label="Name" hint="default cml-worker-<template>-<id>" error={err?.violationFor("name")}>
            <input value={name} onInput={(e) => setName(e.currentTarget.value)} />
          </Field>
          <Field label="Region" error={err?.violationFor("region")}>
            <select value={region} onChange={(e) => setRegion(e.currentTarget.value)}>
              <option value="">Deployment default</option>
              {(tpl?.regions ?? []).map((r) => (
                <option key={r}>{r}</option>
              ))}
            </select>
          </Field>
          <Field label="AMI id" hint={tpl ? `default: newest AMI matching ${tpl.amiPattern}` : ""} error={err?.violationFor("ami_id")}>
            <input value={amiId} onInput={(e) => setAmi(e.currentTarget.value)} placeholder="ami-…" />
          </Field>
          <ErrorBox error={err} />
        </Modal>
      )}
    </>
  );
}

export function ImportWorkersButton() {
  const [open, setOpen] = useState(false);
  const [by, setBy] = useState<"awsInstanceId" | "amiId" | "amiName">("awsInstanceId");
  const [value, setValue] = useState("");
  const [all, setAll] = useState(false);
  const [templateName, setTemplate] = useState("");
  const [busy, setBusy] = useState(false);
  const [err, setErr] = useState<ApiError | undefined>();
  const submit = async () => {
    setBusy(true);
    setErr(undefined);
    try {
      const r = await api.call(WorkerService.method.importWorkers, { selector: { case: by, value }, importAll: all, templateName });
      r.imported.forEach((w) => store.putWorker(w));
      toast(`Imported ${r.imported.length} of ${r.totalFound} found${r.skipped.length ? `; skipped ${r.skipped.map((s) => `${s.awsInstanceId} (${s.reason})`).join(", ")}` : ""}`);
      setOpen(false);
    } catch (e) {
      setErr(e instanceof ApiError ? e : new ApiError(0, "Error", String(e)));
    } finally {
      setBusy(false);
    }
  };
  return (
    <>
      <button class="btn" onClick={() => setOpen(true)}>
        Import
      </button>
      {open && (
        <Modal
          title="Import EC2 instances"
          onClose={() => setOpen(false)}
          footer={
            <>
              <button class="btn btn-ghost" onClick={() => setOpen(false)}>
                Cancel
              </button>
              <button class="btn btn-primary" disabled={busy || !value} onClick={() => void submit()}>
                {busy ? "Importing…" : "Import"}
              </button>
            </>
          }
        >
          <Field label="Find by">
            <select value={by} onChange={(e) => setBy(e.currentTarget.value as typeof by)}>
              <option value="awsInstanceId">EC2 instance id</option>
              <option value="amiId">AMI id</option>
              <option value="amiName">AMI name contains</option>
            </select>
          </Field>
          <Field label="Value" error={err?.violationFor("aws_instance_id") ?? err?.violationFor("ami_id") ?? err?.violationFor("ami_name")}>
            <input value={value} onInput={(e) => setValue(e.currentTarget.value)} placeholder={by === "awsInstanceId" ? "i-0123456789abcdef0" : by === "amiId" ? "ami-…" : "CML-2.9"} />
          </Field>
          <label class="check">
            <input type="checkbox" checked={all} onChange={(e) => setAll(e.currentTarget.checked)} /> Import every match (bulk)
          </label>
          <Field label="Adopt into template" hint="empty imports legacy (unmanaged) workers">
            <input value={templateName} onInput={(e) => setTemplate(e.currentTarget.value)} />
          </Field>
          <ErrorBox error={err} />
        </Modal>
      )}
    </>
  );
}
