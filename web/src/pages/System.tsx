// System: service health, leaders, control loops, session and API links.

import { ReconcileOutcome } from "../gen/ccm/v1/controller_pb";
import { WorkerState } from "../gen/ccm/v1/worker_pb";
import { InstanceState } from "../gen/ccm/v1/instance_pb";
import type { LeaderInfo } from "../gen/ccm/v1/scheduler_pb";
import { ControllerService, SchedulerService, api } from "../api/services";
import { durationSeconds, enumLabel, fmtAgo, fmtSeconds, fmtTime } from "../lib/format";
import { Badge, Card, ErrorBox, KV, Spinner } from "../ui/kit";
import { useAsync, useNow, useSession, useStore } from "../ui/hooks";
import { capText } from "./common";

/** How often the page re-reads health and status. */
export const SYSTEM_REFRESH_MS = 15_000;

async function probe(path: string, signal: AbortSignal): Promise<{ ok: boolean; status: number; body: string }> {
  try {
    const r = await fetch(path, { signal, cache: "no-store" });
    return { ok: r.ok, status: r.status, body: (await r.text()).slice(0, 400) };
  } catch (e) {
    if (signal.aborted) throw e;
    return { ok: false, status: 0, body: e instanceof Error ? e.message : String(e) };
  }
}

function Leader({ l }: { l: LeaderInfo | undefined }) {
  if (!l) return <span class="muted">unknown</span>;
  return (
    <span data-testid="leader">
      <Badge tone={l.holderId ? "ok" : "bad"}>{l.holderId ? `leader: ${l.holderId}` : "no leader"}</Badge> epoch {String(l.epoch)}
      {l.replicaId && <span class="muted small"> · this replica {l.replicaId}{l.isLeader ? " (leading)" : ""}</span>}
      <div class="muted small">
        acquired {fmtAgo(l.acquiredAt)} · lease until {fmtTime(l.leaseExpiresAt)}
      </div>
    </span>
  );
}

export function SystemPage() {
  const s = useStore();
  const session = useSession();
  const tick = Math.floor(useNow(SYSTEM_REFRESH_MS) / SYSTEM_REFRESH_MS);
  const health = useAsync(async (signal) => Promise.all([probe("/healthz", signal), probe("/readyz", signal)]), [tick]);
  const sch = useAsync((signal) => api.call(SchedulerService.method.getSchedulerStatus, {}, { signal }), [tick]);
  const ctl = useAsync((signal) => api.call(ControllerService.method.getControllerStatus, {}, { signal }), [tick]);
  const fleet = ctl.data?.fleet;
  return (
    <div class="page" data-testid="page-system">
      <div class="page-head">
        <h1>System</h1>
        <span class="muted small">refreshes every {SYSTEM_REFRESH_MS / 1000} s</span>
      </div>
      <div class="grid-3">
        <Card title="Gateway">
          {!health.data ? (
            <Spinner />
          ) : (
            <KV
              rows={[
                ["Live (/healthz)", <Badge tone={health.data[0].ok ? "ok" : "bad"}>{health.data[0].ok ? "ok" : `HTTP ${health.data[0].status}`}</Badge>],
                ["Ready (/readyz)", <Badge tone={health.data[1].ok ? "ok" : "bad"}>{health.data[1].ok ? "ready" : `HTTP ${health.data[1].status}`}</Badge>],
                ["Details", <pre class="code small">{health.data[1].body}</pre>],
                ["Live feed", `${s.feedStatus}${s.feedDetail ? ` (${s.feedDetail})` : ""}, ${s.eventsSeen} events, revision ${s.lastRevision || "—"}`],
              ]}
            />
          )}
        </Card>
        <Card title="Scheduler">
          <ErrorBox error={sch.error} onRetry={sch.reload} />
          {sch.data && (
            <KV
              rows={[
                ["Leader", <Leader l={sch.data.leader} />],
                ["Queue", `${sch.data.queueDepth} pending, ${sch.data.queueDue} due`],
                ["Score policy", sch.data.scorePolicy],
                ["Cycles / placements", `${String(sch.data.cyclesTotal)} / ${String(sch.data.placementsTotal)}`],
                [
                  "Last cycle",
                  sch.data.lastCycle
                    ? `${fmtAgo(sch.data.lastCycle.startedAt)} (${sch.data.lastCycle.trigger}): ${sch.data.lastCycle.placed} placed, ${sch.data.lastCycle.unschedulable} unschedulable of ${sch.data.lastCycle.instancesConsidered} over ${sch.data.lastCycle.workersConsidered} workers in ${fmtSeconds(durationSeconds(sch.data.lastCycle.duration))}`
                    : "",
                ],
                ["Watch revision", String(sch.data.watchRevision)],
              ]}
            />
          )}
          {!sch.data && !sch.error && <Spinner />}
        </Card>
        <Card title="Controller">
          <ErrorBox error={ctl.error} onRetry={ctl.reload} />
          {ctl.data && (
            <KV
              rows={[
                ["Leader", <Leader l={ctl.data.leader} />],
                ["Cloud", ctl.data.cloudProvider],
                ["Scaling", fleet?.scalingHalted ? <Badge tone="bad">halted: {fleet.haltReason}</Badge> : <Badge tone="ok">active</Badge>],
                ["Booting / unready", `${fleet?.workersBooting ?? 0} / ${fleet?.workersUnready ?? 0}`],
                ["Pending demand", fleet?.pendingDemand ?? 0],
                ["Declared", capText(fleet?.declared)],
                ["Allocated", capText(fleet?.allocated)],
                ["Workers", fleet?.workers.map((w) => `${enumLabel(WorkerState, w.state)} ${w.count}`).join(", ")],
                ["Instances", fleet?.instances.map((i) => `${enumLabel(InstanceState, i.state)} ${i.count}`).join(", ")],
              ]}
            />
          )}
          {!ctl.data && !ctl.error && <Spinner />}
        </Card>
      </div>
      {ctl.data && (
        <Card title="Reconcilers">
          <div class="table-wrap">
            <table class="table compact" data-testid="reconcilers">
              <thead>
                <tr>
                  <th>Name</th>
                  <th>Last run</th>
                  <th>Outcome</th>
                  <th>Why</th>
                  <th>Took</th>
                  <th>Next</th>
                  <th>Runs / errors</th>
                  <th>Queue</th>
                </tr>
              </thead>
              <tbody>
                {ctl.data.reconcilers.map((r) => (
                  <tr key={r.name}>
                    <td>{r.name}</td>
                    <td class="small">{fmtAgo(r.lastRunAt)}</td>
                    <td>
                      <Badge tone={r.lastOutcome === ReconcileOutcome.ERROR ? "bad" : r.lastOutcome === ReconcileOutcome.ACTED ? "info" : "muted"}>{enumLabel(ReconcileOutcome, r.lastOutcome)}</Badge>
                      {r.lastError && <div class="small field-error">{r.lastError}</div>}
                    </td>
                    <td class="small">
                      {r.lastReason} {r.lastTargetId && <span class="muted">{r.lastTargetId.slice(0, 8)}</span>}
                    </td>
                    <td class="small">{fmtSeconds(durationSeconds(r.lastDuration))}</td>
                    <td class="small">{fmtAgo(r.nextRunAt)}</td>
                    <td>
                      {String(r.runsTotal)} / {String(r.errorsTotal)}
                    </td>
                    <td>{r.queueDepth}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
        </Card>
      )}
      <div class="grid-2">
        <Card title="Your session">
          <KV
            rows={[
              ["User", session?.user],
              ["Subject", session?.subject],
              ["Roles", session?.roles.join(", ")],
              ["Authenticated", session?.authenticated ? "yes" : "no (development mode: anonymous)"],
              ["Expires", session?.expiresAt ? `${fmtTime(session.expiresAt)} (${fmtAgo(session.expiresAt)})` : "—"],
            ]}
          />
        </Card>
        <Card title="API">
          <ul class="list">
            <li>
              <a href="/api/docs" target="_blank" rel="noopener">
                Browsable API (/api/docs)
              </a>
            </li>
            <li>
              <a href="/openapi.json" target="_blank" rel="noopener">
                OpenAPI document (/openapi.json)
              </a>
            </li>
          </ul>
        </Card>
      </div>
    </div>
  );
}

