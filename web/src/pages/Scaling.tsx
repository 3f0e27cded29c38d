// Scaling decisions (with "reconcile now") and the audit log.

import { useState } from "preact/hooks";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { ScalingAction, ScalingTrigger, type ScalingDecision } from "../gen/ccm/v1/scaling_pb";
import { ReconcileScope } from "../gen/ccm/v1/controller_pb";
import { ActorKind, ResourceKind, type AuditRecord } from "../gen/ccm/v1/event_pb";
import { ControllerService, EventService, api } from "../api/services";
import { enumLabel, fmtTime } from "../lib/format";
import { ActionButton, Badge, Card, Empty, EnumSelect, ErrorBox, Gate, Spinner, Tabs, toast } from "../ui/kit";
import { useAsync, useStore } from "../ui/hooks";
import { actionTone } from "./common";

/** Page size of the decision and audit tables. */
export const PAGE = 50;

function Decisions() {
  const s = useStore();
  const [action, setAction] = useState(0);
  const [template, setTemplate] = useState("");
  const [worker, setWorker] = useState("");
  const [pages, setPages] = useState<{ items: ScalingDecision[]; next: string }>({ items: [], next: "" });
  const first = useAsync(
    async (signal) => {
      const r = await api.call(ControllerService.method.listScalingDecisions, { pageSize: PAGE, actions: action ? [action] : [], templateName: template, workerId: worker }, { signal });
      setPages({ items: r.decisions, next: r.nextPageToken });
      return r;
    },
    [action, template, worker, s.decisions[0]?.id],
  );
  const more = async () => {
    const r = await api.call(ControllerService.method.listScalingDecisions, { pageSize: PAGE, pageToken: pages.next, actions: action ? [action] : [], templateName: template, workerId: worker });
    setPages({ items: [...pages.items, ...r.decisions], next: r.nextPageToken });
  };
  return (
    <Card
      actions={
        <Gate method={ControllerService.method.reconcile}>
          <ActionButton
            label="Reconcile now"
            askReason
            run={async (reason) => {
              const r = await api.call(ControllerService.method.reconcile, { scope: ReconcileScope.AUTOSCALER, reason: reason || "manual from the UI" });
              toast(r.accepted ? `Queued: ${r.reconcilers.join(", ")}` : "Not accepted", r.accepted ? "ok" : "warn");
            }}
            done="Reconcile requested"
          />
        </Gate>
      }
    >
      <div class="filters">
        <EnumSelect e={ScalingAction} value={action} onChange={setAction} anyLabel="Any action" aria-label="Action" />
        <input placeholder="Template" value={template} onInput={(e) => setTemplate(e.currentTarget.value)} aria-label="Template" />
        <select value={worker} onChange={(e) => setWorker(e.currentTarget.value)} aria-label="Worker">
          <option value="">Any worker</option>
          {[...s.workers.values()].map((w) => (
            <option key={w.id} value={w.id}>
              {w.name}
            </option>
          ))}
        </select>
      </div>
      <ErrorBox error={first.error} onRetry={first.reload} />
      {first.loading && pages.items.length === 0 ? (
        <Spinner />
      ) : pages.items.length === 0 ? (
        <Empty>No scaling decisions.</Empty>
      ) : (
        <div class="table-wrap">
          <table class="table" data-testid="decisions">
            <thead>
              <tr>
                <th>When</th>
                <th>Action</th>
                <th>Target</th>
                <th>Reason</th>
                <th>By</th>
                <th>Ready at</th>
              </tr>
            </thead>
            <tbody>
              {pages.items.map((d) => (
                <tr key={d.id}>
                  <td class="small">{fmtTime(d.at)}</td>
                  <td>
                    <Badge tone={actionTone(d.action)}>{enumLabel(ScalingAction, d.action)}</Badge> {d.count > 1 ? `×${d.count}` : ""}
                  </td>
                  <td>
                    {d.templateName}
                    {d.workerId && (
                      <>
                        {" "}
                        <a href={`#/workers/${d.workerId}`}>{s.workers.get(d.workerId)?.name ?? d.workerId.slice(0, 8)}</a>
                      </>
                    )}
                  </td>
                  <td>
                    {d.reason} <span class="muted small">{d.reasonCode}</span>
                    {d.instanceIds.length > 0 && <div class="muted small">{d.instanceIds.length} instance(s)</div>}
                  </td>
                  <td class="small">
                    {enumLabel(ScalingTrigger, d.triggeredBy)} {d.triggeredBySubject}
                  </td>
                  <td class="small">{fmtTime(d.estimatedReadyAt)}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
      {pages.next && (
        <button class="btn" onClick={() => void more()}>
          Load more
        </button>
      )}
    </Card>
  );
}

function Audit() {
  const [kind, setKind] = useState(0);
  const [resourceId, setResourceId] = useState("");
  const [actor, setActor] = useState("");
  const [actionPrefix, setActionPrefix] = useState("");
  const [sinceHours, setSinceHours] = useState(24);
  const [pages, setPages] = useState<{ items: AuditRecord[]; next: string }>({ items: [], next: "" });
  const req = () => ({ pageSize: PAGE, resourceKind: kind, resourceId, actor, actionPrefix, ...(sinceHours ? { since: timestampFromDate(new Date(Date.now() - sinceHours * 3_600_000)) } : {}) });
  const first = useAsync(
    async (signal) => {
      const r = await api.call(EventService.method.listAuditRecords, req(), { signal });
      setPages({ items: r.records, next: r.nextPageToken });
      return r;
    },
    [kind, resourceId, actor, actionPrefix, sinceHours],
  );
  const more = async () => {
    const r = await api.call(EventService.method.listAuditRecords, { ...req(), pageToken: pages.next });
    setPages({ items: [...pages.items, ...r.records], next: r.nextPageToken });
  };
  return (
    <Card>
      <div class="filters">
        <EnumSelect e={ResourceKind} value={kind} onChange={setKind} anyLabel="Any resource" aria-label="Resource kind" />
        <input placeholder="Resource id" value={resourceId} onInput={(e) => setResourceId(e.currentTarget.value)} aria-label="Resource id" />
        <input placeholder="Actor, e.g. user:alice" value={actor} onInput={(e) => setActor(e.currentTarget.value)} aria-label="Actor" />
        <input placeholder="Action prefix, e.g. worker." value={actionPrefix} onInput={(e) => setActionPrefix(e.currentTarget.value)} aria-label="Action prefix" />
        <select value={String(sinceHours)} onChange={(e) => setSinceHours(Number(e.currentTarget.value))} aria-label="Since">
          <option value="1">Last hour</option>
          <option value="24">Last 24 h</option>
          <option value="168">Last 7 days</option>
          <option value="0">All</option>
        </select>
      </div>
      <ErrorBox error={first.error} onRetry={first.reload} />
      {first.loading && pages.items.length === 0 ? (
        <Spinner />
      ) : pages.items.length === 0 ? (
        <Empty>No audit records match.</Empty>
      ) : (
        <div class="table-wrap">
          <table class="table compact" data-testid="audit">
            <thead>
              <tr>
                <th>When</th>
                <th>Actor</th>
                <th>Action</th>
                <th>Resource</th>
                <th>Transition</th>
                <th>Reason</th>
              </tr>
            </thead>
            <tbody>
              {pages.items.map((a) => (
                <tr key={a.id}>
                  <td class="small">{fmtTime(a.at)}</td>
                  <td class="small">
                    {a.actor} <span class="muted">{enumLabel(ActorKind, a.actorKind)}</span>
                  </td>
                  <td>
                    <code>{a.action}</code>
                  </td>
                  <td class="small">
                    {enumLabel(ResourceKind, a.resourceKind)}{" "}
                    {a.resourceKind === ResourceKind.WORKER ? <a href={`#/workers/${a.resourceId}`}>{a.resourceId.slice(0, 8)}</a> : a.resourceKind === ResourceKind.INSTANCE ? <a href={`#/instances/${a.resourceId}`}>{a.resourceId.slice(0, 8)}</a> : a.resourceId.slice(0, 12)}
                  </td>
                  <td class="small">{a.fromState || a.toState ? `${a.fromState || "∅"} → ${a.toState}` : ""}</td>
                  <td class="small">{a.reason}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
      {pages.next && (
        <button class="btn" onClick={() => void more()}>
          Load more
        </button>
      )}
    </Card>
  );
}

export function ScalingPage() {
  const [tab, setTab] = useState<"decisions" | "audit">("decisions");
  return (
    <div class="page" data-testid="page-scaling">
      <div class="page-head">
        <h1>Scaling &amp; audit</h1>
      </div>
      <Tabs<"decisions" | "audit">
        tabs={[
          ["decisions", "Scaling decisions"],
          ["audit", "Audit log"],
        ]}
        active={tab}
        onChange={setTab}
      />
      {tab === "decisions" ? <Decisions /> : <Audit />}
    </div>
  );
}
