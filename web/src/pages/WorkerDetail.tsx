// One worker: EC2, CML, licence, capacity and ports, bookings, labs,
// operations, instances; actions by role.

import { useEffect, useRef, useState } from "preact/hooks";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { CmlLabState, CmlServiceStatus, LabAction, LicenseStatus, OperationStatus, RefreshSkipReason, WorkerDesiredState, WorkerOperationKind, type CmlWorker } from "../gen/ccm/v1/worker_pb";
import { InstanceService, WorkerService, api } from "../api/services";
import { durationSeconds, enumLabel, fmtAgo, fmtBytes, fmtSeconds, fmtTime } from "../lib/format";
import { ActionButton, Badge, Card, Empty, ErrorBox, Gate, InstanceStateBadge, KV, Meter, PercentBar, Spinner, Tabs, WorkerStateBadge, toast } from "../ui/kit";
import { useAsync, useNow, useStore } from "../ui/hooks";
import { Gantt } from "../ui/Gantt";
import { Conditions, capText } from "./common";
import { LicenseBadge, WorkerActions } from "./Workers";

type Tab = "overview" | "cml" | "capacity" | "labs" | "instances" | "operations";

function RefreshButton({ w }: { w: CmlWorker }) {
  return (
    <Gate method={WorkerService.method.refreshWorker}>
      <ActionButton
        label="Refresh"
        run={async () => {
          const r = await api.call(WorkerService.method.refreshWorker, { workerId: w.id, includeLabs: true });
          if (!r.scheduled) {
            const retry = r.retryAfter ? ` — retry in ${fmtSeconds(durationSeconds(r.retryAfter))}` : "";
            toast(`Refresh skipped: ${enumLabel(RefreshSkipReason, r.skipReason).toLowerCase()}${retry}`, "warn");
          }
        }}
        done="Refresh queued"
      />
    </Gate>
  );
}

function Overview({ w, now }: { w: CmlWorker; now: number }) {
  const e = w.ec2;
  return (
    <div class="grid-2">
      <Card title="State">
        <KV
          rows={[
            ["State", <WorkerStateBadge state={w.state} />],
            ["Reason", w.stateReason],
            ["Desired", enumLabel(WorkerDesiredState, w.desiredState)],
            ["CML service", enumLabel(CmlServiceStatus, w.serviceStatus)],
            ["Template", w.templateName || "legacy (unmanaged)"],
            ["Created", `${fmtTime(w.createdAt)} by ${w.createdBy || "—"}`],
            ["Start requested", w.startInitiatedAt ? `${fmtAgo(w.startInitiatedAt, now)} (starting…)` : ""],
            ["Stop requested", w.stopInitiatedAt ? `${fmtAgo(w.stopInitiatedAt, now)} (stopping…)` : ""],
            ["Next poll", w.nextRefreshAt ? `${fmtAgo(w.nextRefreshAt, now)} (every ${fmtSeconds(durationSeconds(w.pollInterval))})` : ""],
            ["Terminated", w.terminatedAt ? `${fmtTime(w.terminatedAt)} by ${w.terminatedBy}` : ""],
          ]}
        />
        {w.drain && (
          <div class="notice" data-testid="drain-info">
            <strong>Draining</strong> since {fmtTime(w.drain.drainStartedAt)} ({w.drain.reason}) by {w.drain.requestedBy}; deadline {fmtTime(w.drain.deadline)} ({fmtAgo(w.drain.deadline, now)}); {w.drain.instancesAtStart} instance(s) at start.
          </div>
        )}
      </Card>
      <Card title="EC2">
        {e ? (
          <KV
            rows={[
              ["Instance", e.instanceId ? <a href={`https://console.aws.amazon.com/ec2/home?region=${e.region}#InstanceDetails:instanceId=${e.instanceId}`} target="_blank" rel="noopener">{e.instanceId}</a> : ""],
              ["Type", e.instanceType],
              ["Region", e.region],
              ["EC2 state", e.instanceState],
              ["Status checks", `${e.instanceStatusCheck || "—"} / ${e.systemStatusCheck || "—"}`],
              ["Public / private IP", `${e.publicIp || "—"} / ${e.privateIp || "—"}`],
              ["Endpoint", e.httpsEndpoint ? <a href={e.httpsEndpoint} target="_blank" rel="noopener">{e.httpsEndpoint}</a> : ""],
              ["AMI", `${e.amiId} ${e.amiName ? `(${e.amiName})` : ""}`],
              ["Launched", fmtTime(e.launchTime)],
              ["Detailed monitoring", e.detailedMonitoringEnabled ? "on" : "off"],
              ["Last checked", fmtAgo(e.lastCheckedAt, now)],
              ["Tags", Object.entries(e.tags).map(([k, v]) => <Badge key={k} tone="muted">{`${k}=${v}`}</Badge>)],
            ]}
          />
        ) : (
          <Empty>No EC2 instance yet.</Empty>
        )}
      </Card>
      <Card title="Conditions" class="span-2">
        <Conditions conditions={w.conditions} />
      </Card>
    </div>
  );
}

function CmlTab({ w, now }: { w: CmlWorker; now: number }) {
  const c = w.cml;
  const l = w.license;
  const st = c?.stats;
  const [token, setToken] = useState("");
  return (
    <div class="grid-2">
      <Card title="CML">
        {c ? (
          <KV
            rows={[
              ["Version", c.version],
              ["Ready", c.ready ? "yes" : "no"],
              ["Labs", c.labsCount],
              ["Nodes running / defined", st ? `${st.runningNodes} / ${st.totalNodes}` : ""],
              ["Last synced", fmtAgo(c.lastSyncedAt, now)],
              ["Health", c.health ? (c.health.valid ? <Badge tone="ok">valid</Badge> : <Badge tone="bad">invalid</Badge>) : ""],
              ["Computes ready", c.health ? `${c.health.computesReady} / ${c.health.computesTotal}` : ""],
              ["Controller", c.health ? `${c.health.controllerActive ? "active" : "inactive"}, ${c.health.controllerHasQuorum ? "quorum" : "no quorum"}` : ""],
              ["Issues", c.health?.issues.join("; ")],
            ]}
          />
        ) : (
          <Empty>CML not observed yet.</Empty>
        )}
      </Card>
      <Card title="Utilisation">
        {w.utilization ? (
          <>
            <PercentBar label="CPU" value={w.utilization.cpuPercent} />
            <PercentBar label="Memory" value={w.utilization.memoryPercent} />
            <PercentBar label="Storage" value={w.utilization.storagePercent} />
            <p class="muted small">
              Load {st?.load.map((x) => x.toFixed(2)).join(" / ") || "—"} · CloudWatch CPU {w.utilization.cloudwatchCpuPercent.toFixed(0)}% mem {w.utilization.cloudwatchMemoryPercent.toFixed(0)}% · collected {fmtAgo(w.utilization.collectedAt, now)}
            </p>
            {st && (
              <p class="muted small">
                Memory {fmtBytes(st.memoryUsedBytes)} / {fmtBytes(st.memoryTotalBytes)} · disk {fmtBytes(st.diskUsedBytes)} / {fmtBytes(st.diskTotalBytes)} · {st.cpuCount} CPUs, {st.allocatedCpus} allocated
              </p>
            )}
          </>
        ) : (
          <Empty>Not measured yet.</Empty>
        )}
      </Card>
      <Card title="Licence" class="span-2" actions={<LicenseBadge w={w} />}>
        {l ? (
          <KV
            rows={[
              ["Status", enumLabel(LicenseStatus, l.status)],
              ["Licensed / enterprise", `${l.isLicensed ? "yes" : "no"} / ${l.isEnterprise ? "yes" : "no"}`],
              ["Smart / virtual account", `${l.smartAccount || "—"} / ${l.virtualAccount || "—"}`],
              ["Authorisation", l.authorizationStatus],
              ["Registered", fmtTime(l.registeredAt)],
              ["Expires", fmtTime(l.expiryDate)],
              ["Token stored", l.tokenSet ? "yes" : "no"],
              ["Operation running", l.operationInProgress ? "yes" : "no"],
              ["Features", l.features.map((f) => `${f.name} (${f.inUse}/${f.max}, ${f.status})`).join("; ")],
            ]}
          />
        ) : (
          <Empty>No licence information.</Empty>
        )}
        <Gate method={WorkerService.method.registerWorkerLicense}>
          <div class="inline-form">
            <input type="password" placeholder="Smart Licensing token" value={token} onInput={(e) => setToken(e.currentTarget.value)} aria-label="Licence token" />
            <ActionButton label="Register licence" confirm="Registration takes up to 90 s; progress shows under Operations." run={() => api.call(WorkerService.method.registerWorkerLicense, { workerId: w.id, licenseToken: token, reregister: l?.status === LicenseStatus.REGISTERED })} done="Registration started" />
            <ActionButton label="Deregister" danger confirm="Deregister the CML licence? This takes 10–60 s." run={() => api.call(WorkerService.method.deregisterWorkerLicense, { workerId: w.id })} done="Deregistration started" />
          </div>
        </Gate>
      </Card>
    </div>
  );
}

function CapacityTab({ w }: { w: CmlWorker }) {
  const [hours, setHours] = useState(24);
  const box = useRef<HTMLDivElement>(null);
  const [width, setWidth] = useState(900);
  useEffect(() => {
    const el = box.current;
    if (!el) return;
    const ro = new ResizeObserver(() => setWidth(el.clientWidth));
    ro.observe(el);
    return () => ro.disconnect();
  }, []);
  const start = useRef(Date.now() - 3_600_000).current;
  const end = start + hours * 3_600_000;
  const cap = useAsync(
    (signal) => api.call(WorkerService.method.getWorkerCapacity, { workerId: w.id, windowStart: timestampFromDate(new Date(start)), windowEnd: timestampFromDate(new Date(end)) }, { signal }),
    [w.id, hours, w.resourceVersion],
  );
  const c = cap.data;
  return (
    <div ref={box}>
      <ErrorBox error={cap.error} onRetry={cap.reload} />
      {!c && cap.loading && <Spinner />}
      {c && (
        <>
          <div class="grid-2">
            <Card title="Capacity now">
              <div class="meters">
                <Meter label="CPU cores" used={c.allocated?.cpuCores ?? 0} total={c.declared?.cpuCores ?? 0} />
                <Meter label="Memory" used={c.allocated?.memoryGb ?? 0} total={c.declared?.memoryGb ?? 0} unit=" GiB" />
                <Meter label="Storage" used={c.allocated?.storageGb ?? 0} total={c.declared?.storageGb ?? 0} unit=" GiB" />
                <Meter label="Nodes" used={c.allocated?.maxNodes ?? 0} total={c.declared?.maxNodes ?? 0} />
              </div>
              <p class="muted small">Available: {capText(c.available)}</p>
            </Card>
            <Card title="Ports">
              {c.ports ? (
                <>
                  <Meter label={`${c.ports.range?.start ?? 0}–${c.ports.range?.end ?? 0}`} used={c.ports.used} total={c.ports.total} />
                  <table class="table compact">
                    <thead>
                      <tr>
                        <th>Instance</th>
                        <th>Ports</th>
                      </tr>
                    </thead>
                    <tbody>
                      {c.ports.allocations.map((a) => (
                        <tr key={a.instanceId}>
                          <td>
                            <a href={`#/instances/${a.instanceId}`}>{a.instanceId.slice(0, 8)}</a>
                          </td>
                          <td class="small">
                            {Object.entries(a.ports)
                              .map(([n, p]) => `${n}:${p}`)
                              .join(" ")}
                          </td>
                        </tr>
                      ))}
                    </tbody>
                  </table>
                </>
              ) : (
                <Empty>No port data.</Empty>
              )}
            </Card>
          </div>
          <Card
            title="Bookings"
            actions={
              <select value={String(hours)} onChange={(e) => setHours(Number(e.currentTarget.value))} aria-label="Window">
                <option value="6">6 h</option>
                <option value="24">24 h</option>
                <option value="72">3 days</option>
                <option value="168">7 days</option>
              </select>
            }
          >
            <Gantt rows={[{ id: w.id, label: w.name, capacity: c }]} start={start} end={end} width={Math.max(400, width - 40)} />
          </Card>
        </>
      )}
    </div>
  );
}

function LabsTab({ w }: { w: CmlWorker }) {
  const labs = useAsync((signal) => api.call(WorkerService.method.listWorkerLabs, { workerId: w.id, pageSize: 500 }, { signal }), [w.id]);
  if (labs.error) return <ErrorBox error={labs.error} onRetry={labs.reload} />;
  if (!labs.data) return <Spinner />;
  if (labs.data.labs.length === 0) return <Empty>No labs on this worker (last synced {fmtAgo(labs.data.lastSyncedAt)}).</Empty>;
  const act = (labId: string, action: LabAction) => api.call(WorkerService.method.controlWorkerLab, { workerId: w.id, labId, action });
  return (
    <div class="table-wrap">
      <p class="muted small">Last synced {fmtAgo(labs.data.lastSyncedAt)}</p>
      <table class="table">
        <thead>
          <tr>
            <th>Title</th>
            <th>State</th>
            <th>Nodes / links</th>
            <th>Owner</th>
            <th>Instance</th>
            <th>Modified</th>
            <th />
          </tr>
        </thead>
        <tbody>
          {labs.data.labs.map((l) => (
            <tr key={l.labId}>
              <td>
                {l.title}
                <div class="muted small">{l.description}</div>
              </td>
              <td>{enumLabel(CmlLabState, l.state)}</td>
              <td>
                {l.nodeCount} / {l.linkCount}
              </td>
              <td>{l.ownerFullname || l.ownerUsername}</td>
              <td>{l.instanceId ? <a href={`#/instances/${l.instanceId}`}>{l.instanceId.slice(0, 8)}</a> : "—"}</td>
              <td class="small">{fmtTime(l.modifiedAt)}</td>
              <td>
                <Gate method={WorkerService.method.controlWorkerLab}>
                  <span class="actions">
                    <ActionButton small label="Start" run={() => act(l.labId, LabAction.START)} done="Lab start queued" />
                    <ActionButton small label="Stop" run={() => act(l.labId, LabAction.STOP)} done="Lab stop queued" />
                    <ActionButton small label="Wipe" confirm={`Wipe ${l.title}? Node state is lost.`} run={() => act(l.labId, LabAction.WIPE)} done="Lab wipe queued" />
                    <ActionButton small danger label="Delete" confirm={`Delete ${l.title} from CML?`} run={() => act(l.labId, LabAction.DELETE)} done="Lab delete queued" />
                  </span>
                </Gate>
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

function InstancesTab({ w }: { w: CmlWorker }) {
  const r = useAsync((signal) => api.call(InstanceService.method.listInstances, { workerId: w.id, pageSize: 200 }, { signal }), [w.id, w.instanceIds.length]);
  if (r.error) return <ErrorBox error={r.error} onRetry={r.reload} />;
  if (!r.data) return <Spinner />;
  if (r.data.instances.length === 0) return <Empty>No instances on this worker.</Empty>;
  return (
    <ul class="list">
      {r.data.instances.map((i) => (
        <li key={i.id}>
          <a href={`#/instances/${i.id}`}>{i.definitionName || i.id.slice(0, 8)}</a> <InstanceStateBadge state={i.state} /> <span class="muted small">owner {i.ownerId} · {fmtTime(i.timeSlot?.start)} → {fmtTime(i.timeSlot?.end)}</span>
        </li>
      ))}
    </ul>
  );
}

function OperationsTab({ w }: { w: CmlWorker }) {
  const r = useAsync((signal) => api.call(WorkerService.method.listWorkerOperations, { workerId: w.id, pageSize: 50 }, { signal }), [w.id, w.resourceVersion]);
  if (r.error) return <ErrorBox error={r.error} onRetry={r.reload} />;
  if (!r.data) return <Spinner />;
  if (r.data.operations.length === 0) return <Empty>No operations yet.</Empty>;
  return (
    <table class="table compact">
      <thead>
        <tr>
          <th>Kind</th>
          <th>Status</th>
          <th>By</th>
          <th>Created</th>
          <th>Completed</th>
          <th>Error / result</th>
        </tr>
      </thead>
      <tbody>
        {r.data.operations.map((o) => (
          <tr key={o.id}>
            <td>
              {enumLabel(WorkerOperationKind, o.kind)}
              {o.labId && <span class="muted small"> {enumLabel(LabAction, o.labAction)} {o.labId.slice(0, 8)}</span>}
            </td>
            <td>
              <Badge tone={o.status === OperationStatus.SUCCEEDED ? "ok" : o.status === OperationStatus.FAILED ? "bad" : o.status === OperationStatus.CANCELLED ? "muted" : "info"}>{enumLabel(OperationStatus, o.status)}</Badge>
            </td>
            <td class="small">{o.requestedBy}</td>
            <td class="small">{fmtTime(o.createdAt)}</td>
            <td class="small">{fmtTime(o.completedAt)}</td>
            <td class="small">{o.error || (o.result ? JSON.stringify(o.result) : "")}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

export function WorkerDetailPage({ id }: { id: string }) {
  const s = useStore();
  const now = useNow(5000);
  const [tab, setTab] = useState<Tab>("overview");
  const live = s.workers.get(id);
  const fetched = useAsync(async (signal) => (live ? undefined : (await api.call(WorkerService.method.getWorker, { workerId: id }, { signal })).worker), [id, !!live]);
  const w = live ?? fetched.data;
  if (!w) return fetched.error ? <ErrorBox error={fetched.error} onRetry={fetched.reload} /> : <Spinner label="Loading the worker…" />;
  return (
    <div class="page" data-testid="page-worker">
      <div class="page-head">
        <div>
          <a href="#/workers" class="muted small">
            ← Workers
          </a>
          <h1>
            {w.name} <WorkerStateBadge state={w.state} />
          </h1>
          <div class="muted small">
            {w.id} · updated {fmtAgo(w.updatedAt, now)}
          </div>
        </div>
        <div class="page-actions">
          <RefreshButton w={w} />
          <WorkerActions w={w} />
        </div>
      </div>
      <Tabs<Tab>
        tabs={[
          ["overview", "Overview & EC2"],
          ["cml", "CML & licence"],
          ["capacity", "Capacity & bookings"],
          ["labs", "Labs"],
          ["instances", `Instances (${w.instanceIds.length})`],
          ["operations", "Operations"],
        ]}
        active={tab}
        onChange={setTab}
      />
      {tab === "overview" && <Overview w={w} now={now} />}
      {tab === "cml" && <CmlTab w={w} now={now} />}
      {tab === "capacity" && <CapacityTab w={w} />}
      {tab === "labs" && <LabsTab w={w} />}
      {tab === "instances" && <InstancesTab w={w} />}
      {tab === "operations" && <OperationsTab w={w} />}
    </div>
  );
}
