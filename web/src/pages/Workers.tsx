// Workers: table and cards with filters and search; actions by role.

import { useState } from "preact/hooks";
import { LicenseType } from "../gen/ccm/v1/common_pb";
import { LicenseStatus, WorkerState, type CmlWorker } from "../gen/ccm/v1/worker_pb";
import { WorkerService, api, listAll } from "../api/services";
import { store } from "../api/store";
import { enumLabel, fmtAgo } from "../lib/format";
import { ActionButton, Badge, Card, Empty, EnumSelect, ErrorBox, Gate, Meter, PercentBar, Spinner, Stat, WorkerStateBadge, toast } from "../ui/kit";
import { useAsync, useStore } from "../ui/hooks";
import { CreateWorkerButton, ImportWorkersButton } from "./WorkerForms";

/** Start/stop/drain/cancel-drain/terminate buttons a worker's state allows, for roles that may call them. */
export function WorkerActions({ w, small }: { w: CmlWorker; small?: boolean }) {
  const id = w.id;
  const sm = small ?? false;
  return (
    <span class="actions" data-testid="worker-actions">
      {w.state === WorkerState.RUNNING && (
        <Gate method={WorkerService.method.drainWorker}>
          <ActionButton
            small={sm}
            label="Drain"
            testId="drain"
            askReason
            confirm={`Drain ${w.name}? It keeps its ${w.instanceIds.length} instance(s) but takes no new bookings, and stops once empty or at the drain deadline.`}
            run={async (reason) => store.putWorker((await api.call(WorkerService.method.drainWorker, { workerId: id, reason: reason || "admin" })).worker)}
            done={`${w.name} is draining`}
          />
        </Gate>
      )}
      {w.state === WorkerState.DRAINING && (
        <Gate method={WorkerService.method.cancelWorkerDrain}>
          <ActionButton small={sm} label="Cancel drain" testId="cancel-drain" run={async (reason) => store.putWorker((await api.call(WorkerService.method.cancelWorkerDrain, { workerId: id, reason })).worker)} done={`${w.name} takes bookings again`} />
        </Gate>
      )}
      {(w.state === WorkerState.STOPPED || w.state === WorkerState.FAILED) && (
        <Gate method={WorkerService.method.startWorker}>
          <ActionButton small={sm} label="Start" testId="start" run={async (reason) => store.putWorker((await api.call(WorkerService.method.startWorker, { workerId: id, reason })).worker)} done={`${w.name} is starting`} />
        </Gate>
      )}
      {(w.state === WorkerState.RUNNING || w.state === WorkerState.DRAINING) && (
        <Gate method={WorkerService.method.stopWorker}>
          <ActionButton
            small={sm}
            label="Stop"
            testId="stop"
            askReason
            confirm={w.instanceIds.length ? `${w.name} still has ${w.instanceIds.length} instance(s); stopping it terminates them (force).` : `Stop ${w.name}? Its EC2 instance stops; storage is kept.`}
            run={async (reason) => store.putWorker((await api.call(WorkerService.method.stopWorker, { workerId: id, reason, force: w.instanceIds.length > 0 })).worker)}
            done={`${w.name} is stopping`}
          />
        </Gate>
      )}
      {w.state !== WorkerState.TERMINATED && w.state !== WorkerState.SHUTTING_DOWN && (
        <Gate method={WorkerService.method.terminateWorker}>
          <ActionButton
            small={sm}
            danger
            label="Terminate"
            testId="terminate"
            askReason
            confirm={`Terminate ${w.name}? The EC2 instance is destroyed${w.instanceIds.length ? ` and its ${w.instanceIds.length} instance(s) are terminated` : ""}. This cannot be undone.`}
            run={async (reason) => store.putWorker((await api.call(WorkerService.method.terminateWorker, { workerId: id, reason, force: w.instanceIds.length > 0 })).worker)}
            done={`${w.name} is terminating`}
          />
        </Gate>
      )}
    </span>
  );
}

/** Licence badge. */
export function LicenseBadge({ w }: { w: CmlWorker }) {
  const st = w.license?.status ?? LicenseStatus.UNSPECIFIED;
  const tone = st === LicenseStatus.REGISTERED ? "ok" : st === LicenseStatus.EVALUATION ? "info" : st === LicenseStatus.UNSPECIFIED ? "muted" : "warn";
  return (
    <Badge tone={tone} title={enumLabel(LicenseStatus, st)}>
      {w.licenseType ? enumLabel(LicenseType, w.licenseType) : "legacy"}
      {st ? ` · ${enumLabel(LicenseStatus, st).toLowerCase()}` : ""}
    </Badge>
  );
}

function matches(w: CmlWorker, q: string): boolean {
  if (!q) return true;
  const s = q.toLowerCase();
  return [w.name, w.id, w.ec2?.instanceId ?? "", w.ec2?.region ?? "", w.templateName].some((x) => x.toLowerCase().includes(s));
}

function WorkerCard({ w }: { w: CmlWorker }) {
  const d = w.declaredCapacity;
  const a = w.allocatedCapacity;
  return (
    <div class="wcard" data-testid="worker-card" data-worker={w.name}>
      <div class="wcard-head">
        <a href={`#/workers/${w.id}`} class="wcard-name">
          {w.name}
        </a>
        <WorkerStateBadge state={w.state} />
      </div>
      <div class="muted small">
        {w.templateName || "legacy"} · {w.ec2?.instanceType || "—"} · {w.ec2?.region || "—"}
      </div>
      <LicenseBadge w={w} />
      <div class="meters">
        <Meter label="CPU" used={a?.cpuCores ?? 0} total={d?.cpuCores ?? 0} />
        <Meter label="Mem" used={a?.memoryGb ?? 0} total={d?.memoryGb ?? 0} unit=" GiB" />
        <Meter label="Nodes" used={a?.maxNodes ?? 0} total={d?.maxNodes ?? 0} />
      </div>
      {w.utilization && <PercentBar label="CPU use" value={w.utilization.cpuPercent} />}
      <div class="small">
        {w.instanceIds.length} instance(s) · {w.cml?.labsCount ?? 0} lab(s) · {w.availablePorts} ports free
      </div>
      <WorkerActions w={w} small />
    </div>
  );
}

export function WorkersPage() {
  const s = useStore();
  const [view, setView] = useState<"table" | "cards">(() => (window.innerWidth < 800 ? "cards" : "table"));
  const [state, setState] = useState(0);
  const [license, setLicense] = useState(0);
  const [template, setTemplate] = useState("");
  const [q, setQ] = useState("");
  const [withTerminated, setWithTerminated] = useState(false);
  const terminated = useAsync(
    async (signal) =>
      withTerminated
        ? listAll(async (pageToken) => {
            const r = await api.call(WorkerService.method.listWorkers, { pageSize: 500, pageToken, states: [WorkerState.TERMINATED] }, { signal });
            return { items: r.workers, next: r.nextPageToken };
          })
        : [],
    [withTerminated],
  );
  if (!s.loaded && s.loadError) return <ErrorBox error={s.loadError} onRetry={() => void s.reload()} />;
  if (!s.loaded) return <Spinner label="Loading workers…" />;
  const all = [...s.workers.values(), ...(terminated.data ?? []).filter((w) => !s.workers.has(w.id))];
  const templates = [...new Set(all.map((w) => w.templateName).filter(Boolean))].sort();
  const list = all
    .filter((w) => (state ? w.state === state : true))
    .filter((w) => (license ? w.licenseType === license : true))
    .filter((w) => (template ? w.templateName === template : true))
    .filter((w) => matches(w, q))
    .sort((a, b) => a.name.localeCompare(b.name));
  const running = all.filter((w) => w.state === WorkerState.RUNNING);
  const avg = (f: (w: CmlWorker) => number) => (running.length ? Math.round(running.reduce((acc, w) => acc + f(w), 0) / running.length) : 0);

  return (
    <div class="page" data-testid="page-workers">
      <div class="page-head">
        <h1>Workers</h1>
        <div class="page-actions">
          <Gate method={WorkerService.method.createWorker}>
            <CreateWorkerButton />
          </Gate>
          <Gate method={WorkerService.method.importWorkers}>
            <ImportWorkersButton />
          </Gate>
          <button class="btn btn-ghost" onClick={() => void s.reload().then(() => toast("Workers reloaded"))}>
            Reload
          </button>
        </div>
      </div>
      <div class="stats">
        <Stat label="Total" value={all.length} />
        <Stat label="Running" value={running.length} tone="ok" />
        <Stat label="Draining" value={all.filter((w) => w.state === WorkerState.DRAINING).length} tone="warn" />
        <Stat label="Stopped" value={all.filter((w) => w.state === WorkerState.STOPPED).length} />
        <Stat label="Avg CPU / mem / disk use" value={`${avg((w) => w.utilization?.cpuPercent ?? 0)}% / ${avg((w) => w.utilization?.memoryPercent ?? 0)}% / ${avg((w) => w.utilization?.storagePercent ?? 0)}%`} sub="running workers" />
      </div>
      <Card>
        <div class="filters">
          <input type="search" placeholder="Search name, id, EC2 id, region, template" value={q} onInput={(e) => setQ(e.currentTarget.value)} aria-label="Search workers" data-testid="worker-search" />
          <EnumSelect e={WorkerState} value={state} onChange={setState} anyLabel="Any state" aria-label="State" />
          <EnumSelect e={LicenseType} value={license} onChange={setLicense} anyLabel="Any licence" aria-label="Licence type" />
          <select value={template} onChange={(e) => setTemplate(e.currentTarget.value)} aria-label="Template">
            <option value="">Any template</option>
            {templates.map((t) => (
              <option key={t} value={t}>
                {t}
              </option>
            ))}
          </select>
          <label class="check">
            <input type="checkbox" checked={withTerminated} onChange={(e) => setWithTerminated(e.currentTarget.checked)} /> Include terminated
          </label>
          <div class="seg">
            <button class={view === "table" ? "active" : ""} onClick={() => setView("table")} aria-pressed={view === "table"}>
              Table
            </button>
            <button class={view === "cards" ? "active" : ""} onClick={() => setView("cards")} aria-pressed={view === "cards"}>
              Cards
            </button>
          </div>
        </div>
        <ErrorBox error={terminated.error} />
        {list.length === 0 ? (
          <Empty>No worker matches.</Empty>
        ) : view === "cards" ? (
          <div class="cards">
            {list.map((w) => (
              <WorkerCard key={w.id} w={w} />
            ))}
          </div>
        ) : (
          <div class="table-wrap">
            <table class="table" data-testid="workers-table">
              <thead>
                <tr>
                  <th>Name</th>
                  <th>State</th>
                  <th>Template / licence</th>
                  <th>Type · region</th>
                  <th>Booked CPU</th>
                  <th>Booked nodes</th>
                  <th>CPU / mem use</th>
                  <th>Inst.</th>
                  <th>Labs</th>
                  <th>Ports free</th>
                  <th>Updated</th>
                  <th />
                </tr>
              </thead>
              <tbody>
                {list.map((w) => (
                  <tr key={w.id} data-worker={w.name}>
                    <td>
                      <a href={`#/workers/${w.id}`}>{w.name}</a>
                      {w.stateReason && <div class="muted small">{w.stateReason}</div>}
                    </td>
                    <td>
                      <WorkerStateBadge state={w.state} />
                    </td>
                    <td>
                      <div>{w.templateName || <span class="muted">legacy</span>}</div>
                      <LicenseBadge w={w} />
                    </td>
                    <td>
                      {w.ec2?.instanceType || "—"}
                      <div class="muted small">{w.ec2?.region}</div>
                    </td>
                    <td>
                      <Meter used={w.allocatedCapacity?.cpuCores ?? 0} total={w.declaredCapacity?.cpuCores ?? 0} />
                    </td>
                    <td>
                      <Meter used={w.allocatedCapacity?.maxNodes ?? 0} total={w.declaredCapacity?.maxNodes ?? 0} />
                    </td>
                    <td class="small">
                      {w.utilization ? `${Math.round(w.utilization.cpuPercent)}% / ${Math.round(w.utilization.memoryPercent)}%` : "—"}
                    </td>
                    <td>{w.instanceIds.length}</td>
                    <td>{w.cml?.labsCount ?? 0}</td>
                    <td>{w.availablePorts}</td>
                    <td class="small muted">{fmtAgo(w.updatedAt)}</td>
                    <td>
                      <WorkerActions w={w} small />
                    </td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
        )}
      </Card>
    </div>
  );
}
