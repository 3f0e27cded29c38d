// Dashboard: the fleet and bookings at a glance, live over SSE.

import { InstanceState } from "../gen/ccm/v1/instance_pb";
import { WorkerState, type CmlWorker } from "../gen/ccm/v1/worker_pb";
import { ControllerService, SchedulerService, api } from "../api/services";
import { enumLabel, fmtAgo, fmtTime } from "../lib/format";
import { Badge, Card, Empty, ErrorBox, InstanceStateBadge, Meter, Spinner, Stat, instanceTone, workerTone, type Tone } from "../ui/kit";
import { useAsync, useNow, useStore } from "../ui/hooks";
import { DecisionLine, RejectionChips, addCap, whyPending } from "./common";

/** Workers whose capacity counts as "in service". */
const SERVING = [WorkerState.RUNNING, WorkerState.DRAINING];

function countBy<T, K>(items: Iterable<T>, key: (t: T) => K): Map<K, number> {
  const m = new Map<K, number>();
  for (const i of items) m.set(key(i), (m.get(key(i)) ?? 0) + 1);
  return m;
}

/** A stacked horizontal bar of counts by state, with a legend. */
function StateBar<S extends number>({ counts, e, tone, testId }: { counts: Map<S, number>; e: Record<number, string>; tone: (s: S) => Tone; testId: string }) {
  const total = [...counts.values()].reduce((a, b) => a + b, 0);
  const entries = [...counts.entries()].sort((a, b) => a[0] - b[0]);
  if (total === 0) return <Empty>None.</Empty>;
  return (
    <div class="statebar" data-testid={testId}>
      <div class="statebar-track">
        {entries.map(([s, n]) => (
          <span key={s} class={`statebar-seg seg-${tone(s)}`} style={{ width: `${(n / total) * 100}%` }} title={`${enumLabel(e, s)}: ${n}`} />
        ))}
      </div>
      <ul class="legend">
        {entries.map(([s, n]) => (
          <li key={s} data-state={e[s]}>
            <span class={`legend-dot seg-${tone(s)}`} /> {enumLabel(e, s)} <strong data-testid={`${testId}-${e[s]}`}>{n}</strong>
          </li>
        ))}
      </ul>
    </div>
  );
}

export function DashboardPage() {
  const s = useStore();
  const now = useNow();
  const ctl = useAsync((signal) => api.call(ControllerService.method.getControllerStatus, {}, { signal }), []);
  const sch = useAsync((signal) => api.call(SchedulerService.method.getSchedulerStatus, {}, { signal }), []);
  if (!s.loaded && s.loadError) return <ErrorBox error={s.loadError} onRetry={() => void s.reload()} />;
  if (!s.loaded) return <Spinner label="Loading the fleet…" />;

  const workers = [...s.workers.values()];
  const instances = [...s.instances.values()];
  const serving = workers.filter((w) => SERVING.includes(w.state));
  let declared = addCap(undefined, undefined);
  let allocated = addCap(undefined, undefined);
  let portsFree = 0;
  for (const w of serving) {
    declared = addCap(declared, w.declaredCapacity);
    allocated = addCap(allocated, w.allocatedCapacity);
    portsFree += w.availablePorts;
  }
  const pending = instances.filter((i) => i.state === InstanceState.PENDING).sort((a, b) => Number(a.createdAt?.seconds ?? 0n) - Number(b.createdAt?.seconds ?? 0n));
  const running = instances.filter((i) => i.state === InstanceState.RUNNING).length;
  const booting = workers.filter((w) => [WorkerState.PENDING, WorkerState.PROVISIONING, WorkerState.STARTING].includes(w.state)).length;
  const names = new Map(workers.map((w: CmlWorker) => [w.id, w.name]));
  const fleet = ctl.data?.fleet;

  return (
    <div class="page" data-testid="page-dashboard">
      <div class="page-head">
        <h1>Dashboard</h1>
        <span class="muted small">
          {s.eventsSeen} live events · revision {s.lastRevision || "—"}
        </span>
      </div>
      {s.loadError && <ErrorBox error={s.loadError} onRetry={() => void s.reload()} />}
      {fleet?.scalingHalted && (
        <div class="error-box" role="alert">
          <strong>Scaling is halted:</strong> {fleet.haltReason}
        </div>
      )}
      <div class="stats">
        <Stat label="Workers" value={<span data-testid="stat-workers">{workers.length}</span>} sub={`${serving.length} in service · ${booting} booting`} />
        <Stat label="Running instances" value={<span data-testid="stat-running">{running}</span>} sub={`${instances.length} active bookings`} tone="ok" />
        <Stat label="Pending bookings" value={<span data-testid="stat-pending">{pending.length}</span>} tone={pending.length ? "warn" : undefined} sub={fleet ? `${fleet.pendingDemand} demand seen by the autoscaler` : undefined} />
        <Stat label="Free ports" value={portsFree} sub="on workers in service" />
      </div>
      <div class="grid-2">
        <Card title="Workers by state">
          <StateBar counts={countBy(workers, (w) => w.state)} e={WorkerState} tone={workerTone} testId="workers-by-state" />
        </Card>
        <Card title="Instances by state">
          <StateBar counts={countBy(instances, (i) => i.state)} e={InstanceState} tone={instanceTone} testId="instances-by-state" />
        </Card>
      </div>
      <Card title="Capacity of workers in service (booked now / declared)">
        {serving.length === 0 ? (
          <Empty>No worker is running.</Empty>
        ) : (
          <div class="meters">
            <Meter label="CPU cores" used={allocated.cpuCores} total={declared.cpuCores} />
            <Meter label="Memory" used={allocated.memoryGb} total={declared.memoryGb} unit=" GiB" />
            <Meter label="Storage" used={allocated.storageGb} total={declared.storageGb} unit=" GiB" />
            <Meter label="CML nodes" used={allocated.maxNodes} total={declared.maxNodes} />
          </div>
        )}
      </Card>
      <div class="grid-2">
        <Card title={`Pending bookings (${pending.length})`} actions={<a href="#/instances?create=1">New booking</a>}>
          {pending.length === 0 ? (
            <Empty>Nothing is waiting for capacity.</Empty>
          ) : (
            <ul class="list" data-testid="pending-list">
              {pending.slice(0, 12).map((i) => (
                <li key={i.id}>
                  <a href={`#/instances/${i.id}`}>{i.definitionName || i.definitionId.slice(0, 8)}</a> <InstanceStateBadge state={i.state} />{" "}
                  <span class="muted small">booked {fmtAgo(i.createdAt, now)}</span>
                  <div class="why" data-testid="why-pending">
                    {whyPending(i)}
                  </div>
                  <RejectionChips summary={i.pendingSummary} />
                </li>
              ))}
            </ul>
          )}
        </Card>
        <Card title="Scaling activity" actions={<a href="#/scaling">All decisions</a>}>
          {s.decisionsError && s.decisions.length === 0 ? (
            <ErrorBox error={s.decisionsError} />
          ) : s.decisions.length === 0 ? (
            <Empty>No scaling decisions yet.</Empty>
          ) : (
            <ul class="list">
              {s.decisions.slice(0, 10).map((d) => (
                <DecisionLine key={d.id} d={d} workerName={names.get(d.workerId) ?? ""} />
              ))}
            </ul>
          )}
        </Card>
      </div>
      <div class="grid-2">
        <Card title="Live activity">
          {s.activity.length === 0 ? (
            <Empty>Changes appear here as they happen.</Empty>
          ) : (
            <ul class="list small" data-testid="activity">
              {s.activity.slice(0, 15).map((a, n) => (
                <li key={n}>
                  <span class="muted" title={fmtTime(a.at)}>
                    {a.at.toLocaleTimeString()}
                  </span>{" "}
                  {a.text}
                </li>
              ))}
            </ul>
          )}
        </Card>
        <Card title="Control loops">
          <ul class="list small">
            <li>
              Scheduler:{" "}
              {sch.error ? (
                <Badge tone="bad">{sch.error.kind}</Badge>
              ) : sch.data ? (
                <>
                  <Badge tone={sch.data.leader?.isLeader ? "ok" : "neutral"}>{sch.data.leader?.holderId ? `leader ${sch.data.leader.holderId}` : "no leader"}</Badge> queue {sch.data.queueDepth} ({sch.data.queueDue} due), last cycle{" "}
                  {fmtAgo(sch.data.lastCycle?.startedAt, now)}
                </>
              ) : (
                "…"
              )}
            </li>
            <li>
              Controller:{" "}
              {ctl.error ? (
                <Badge tone="bad">{ctl.error.kind}</Badge>
              ) : ctl.data ? (
                <>
                  <Badge tone={ctl.data.leader?.isLeader ? "ok" : "neutral"}>{ctl.data.leader?.holderId ? `leader ${ctl.data.leader.holderId}` : "no leader"}</Badge> {fleet?.workersBooting ?? 0} booting, {fleet?.workersUnready ?? 0} unready
                </>
              ) : (
                "…"
              )}
            </li>
          </ul>
          <a href="#/system">System details</a>
        </Card>
      </div>
    </div>
  );
}
