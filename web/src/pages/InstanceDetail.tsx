// One instance: summary, state history, access, why pending (with the
// scheduler's per-worker what-if), grading, conditions.

import { InstanceState, type LabletInstance } from "../gen/ccm/v1/instance_pb";
import { PortProtocol } from "../gen/ccm/v1/definition_pb";
import { RejectionCode } from "../gen/ccm/v1/placement_pb";
import { can } from "../api/session";
import { InstanceService, SchedulerService, api } from "../api/services";
import { enumLabel, fmtAgo, fmtTime } from "../lib/format";
import { Badge, Card, Empty, ErrorBox, InstanceStateBadge, KV, Spinner } from "../ui/kit";
import { useAsync, useNow, useSession, useStore } from "../ui/hooks";
import { Conditions, RejectionChips, whyPending } from "./common";
import { InstanceActions } from "./Instances";

function Access({ i }: { i: LabletInstance }) {
  const r = useAsync((signal) => api.call(InstanceService.method.getInstanceAccess, { instanceId: i.id }, { signal }), [i.id]);
  if (r.error) return <ErrorBox error={r.error} onRetry={r.reload} />;
  if (!r.data) return <Spinner />;
  const a = r.data.access;
  if (!a) return <Empty>No access information.</Empty>;
  return (
    <>
      <KV rows={[["Host", <code>{a.host}</code>], ["CML lab", a.cmlLabId], ["Valid until", fmtTime(a.validUntil)]]} />
      <table class="table compact" data-testid="access-ports">
        <thead>
          <tr>
            <th>Port</th>
            <th>Protocol</th>
            <th>Number</th>
            <th>Connect</th>
          </tr>
        </thead>
        <tbody>
          {a.ports.map((p) => (
            <tr key={p.name}>
              <td>{p.name}</td>
              <td>{enumLabel(PortProtocol, p.protocol)}</td>
              <td>{p.port}</td>
              <td>{p.uri ? <a href={p.uri}>{p.uri}</a> : <code>{`${a.host}:${p.port}`}</code>}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </>
  );
}

function WhatIf({ i }: { i: LabletInstance }) {
  const r = useAsync((signal) => api.call(SchedulerService.method.plan, { target: { case: "instanceId", value: i.id }, maxCandidates: 5 }, { signal }), [i.id, i.resourceVersion]);
  if (r.error) return <ErrorBox error={r.error} onRetry={r.reload} />;
  if (!r.data) return <Spinner label="Asking the scheduler…" />;
  const p = r.data;
  return (
    <>
      <p>
        {p.feasible ? <Badge tone="ok">feasible now</Badge> : <Badge tone="warn">no worker fits now</Badge>} {p.summary?.message}
      </p>
      {p.candidates.length > 0 && (
        <p class="small">
          Best candidates:{" "}
          {p.candidates.map((c) => (
            <span key={c.workerId}>
              #{c.rank} <a href={`#/workers/${c.workerId}`}>{c.workerName}</a> (score {c.score.toFixed(2)}){" "}
            </span>
          ))}
        </p>
      )}
      {p.rejections.length > 0 && (
        <table class="table compact">
          <thead>
            <tr>
              <th>Worker</th>
              <th>Why not</th>
            </tr>
          </thead>
          <tbody>
            {p.rejections.map((w) => (
              <tr key={w.workerId}>
                <td>
                  <a href={`#/workers/${w.workerId}`}>{w.workerName || w.workerId.slice(0, 8)}</a>
                </td>
                <td class="small">{w.reasons.map((x) => `${enumLabel(RejectionCode, x.code)}${x.message ? `: ${x.message}` : ""}`).join("; ")}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      <button class="btn btn-small" onClick={r.reload}>
        Ask again
      </button>
    </>
  );
}

export function InstanceDetailPage({ id }: { id: string }) {
  const s = useStore();
  const session = useSession();
  const now = useNow(10_000);
  const live = s.instances.get(id);
  const fetched = useAsync(async (signal) => (await api.call(InstanceService.method.getInstance, { instanceId: id }, { signal })).instance, [id, live?.resourceVersion]);
  const i = live ?? fetched.data;
  if (!i) return fetched.error ? <ErrorBox error={fetched.error} onRetry={fetched.reload} /> : <Spinner label="Loading the instance…" />;
  const worker = s.workers.get(i.workerId);
  const showAccess = i.state === InstanceState.RUNNING && can(session, InstanceService.method.getInstanceAccess, i.ownerId);
  return (
    <div class="page" data-testid="page-instance">
      <div class="page-head">
        <div>
          <a href="#/instances" class="muted small">
            ← Instances
          </a>
          <h1>
            {i.definitionName || "Instance"} <InstanceStateBadge state={i.state} />
          </h1>
          <div class="muted small">
            {i.id} · updated {fmtAgo(i.updatedAt, now)}
          </div>
        </div>
        <div class="page-actions">
          <InstanceActions i={i} />
        </div>
      </div>
      {i.state === InstanceState.PENDING && (
        <Card title="Why pending">
          <p class="why" data-testid="why-pending">
            {whyPending(i)}
          </p>
          <RejectionChips summary={i.pendingSummary} />
          {can(session, SchedulerService.method.plan) && <WhatIf i={i} />}
        </Card>
      )}
      <div class="grid-2">
        <Card title="Booking">
          <KV
            rows={[
              ["Definition", <a href={`#/definitions/${i.definitionId}`}>{`${i.definitionName} ${i.definitionVersion}`}</a>],
              ["Time slot", `${i.timeSlot?.asap ? "ASAP · " : ""}${fmtTime(i.timeSlot?.start)} → ${fmtTime(i.timeSlot?.end)}`],
              ["Owner", i.ownerId],
              ["Booked by", i.createdBy],
              ["Reservation", i.reservationId],
              ["Assessment session / part", i.assessmentSessionId ? `${i.assessmentSessionId} / ${i.assessmentPartId}` : ""],
              ["Worker", i.workerId ? <a href={`#/workers/${i.workerId}`}>{worker?.name ?? i.workerId}</a> : ""],
              ["CML lab", i.cmlLabId],
              ["Ports", Object.entries(i.allocatedPorts).map(([n, p]) => <Badge key={n} tone="muted">{`${n}:${p}`}</Badge>)],
              ["Retries", i.retryCount],
              ["Created / scheduled / started", `${fmtTime(i.createdAt)} / ${fmtTime(i.scheduledAt)} / ${fmtTime(i.startedAt)}`],
              ["Terminated", i.terminatedAt ? `${fmtTime(i.terminatedAt)} (${i.terminationReason})` : ""],
            ]}
          />
        </Card>
        <Card title="State history">
          <ol class="history" data-testid="state-history">
            {i.stateHistory.map((h, n) => (
              <li key={n}>
                <span class="muted small">{fmtTime(h.at)}</span> {h.from ? `${enumLabel(InstanceState, h.from)} → ` : ""}
                <strong>{enumLabel(InstanceState, h.to)}</strong> <span class="small">{h.reason}</span> <span class="muted small">{h.actor}</span>
              </li>
            ))}
          </ol>
        </Card>
      </div>
      {showAccess && (
        <Card title="Access">
          <Access i={i} />
        </Card>
      )}
      {i.gradingScore && (
        <Card title="Grading">
          <p>
            {i.gradingScore.total} / {i.gradingScore.max} {i.gradingScore.passed ? <Badge tone="ok">passed</Badge> : <Badge tone="bad">failed</Badge>}
          </p>
          <ul class="list small">
            {i.gradingScore.breakdown.map((b) => (
              <li key={b.criterion}>
                {b.criterion}: {b.points} / {b.max}
              </li>
            ))}
          </ul>
        </Card>
      )}
      <Card title="Conditions">
        <Conditions conditions={i.conditions} />
      </Card>
    </div>
  );
}
