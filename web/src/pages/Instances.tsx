// Instances: list with filters, create a booking, actions by role/owner.

import { useState } from "preact/hooks";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { InstanceState, type LabletInstance } from "../gen/ccm/v1/instance_pb";
import { DefinitionStatus } from "../gen/ccm/v1/definition_pb";
import { ApiError } from "../api/errors";
import { can } from "../api/session";
import { DefinitionService, InstanceService, api, listAll } from "../api/services";
import { store } from "../api/store";
import { durationSeconds, fmtSeconds, fmtTime } from "../lib/format";
import { ActionButton, Card, Empty, EnumSelect, ErrorBox, Field, Gate, InstanceStateBadge, Modal, Spinner, toast } from "../ui/kit";
import { navigate, useAsync, useSession, useStore } from "../ui/hooks";
import { whyPending } from "./common";

const STOPPABLE = [InstanceState.RUNNING, InstanceState.COLLECTING];
const TERMINAL = [InstanceState.TERMINATED];

/** Start/stop/collect/terminate buttons an instance's state allows, for callers that may act on it. */
export function InstanceActions({ i, small }: { i: LabletInstance; small?: boolean }) {
  const sm = small ?? false;
  const session = useSession();
  const isAdmin = session?.roles.includes("admin") ?? false;
  return (
    <span class="actions" data-testid="instance-actions">
      {i.state === InstanceState.STOPPED && (
        <Gate method={InstanceService.method.startInstance} ownerId={i.ownerId}>
          <ActionButton small={sm} label="Start" run={async (reason) => store.putInstance((await api.call(InstanceService.method.startInstance, { instanceId: i.id, reason })).instance)} done="Instance starting" />
        </Gate>
      )}
      {i.state === InstanceState.RUNNING && (
        <Gate method={InstanceService.method.collectInstance} ownerId={i.ownerId}>
          <ActionButton small={sm} label="Collect" confirm="Collect the lab's results now? The assessment platform is called and the lab moves to COLLECTING." run={async (reason) => store.putInstance((await api.call(InstanceService.method.collectInstance, { instanceId: i.id, reason })).instance)} done="Collection started" />
        </Gate>
      )}
      {STOPPABLE.includes(i.state) && (
        <Gate method={InstanceService.method.stopInstance} ownerId={i.ownerId}>
          <ActionButton small={sm} label="Stop" askReason confirm="Stop the lab on CML? Its resources stay booked until it is terminated." run={async (reason) => store.putInstance((await api.call(InstanceService.method.stopInstance, { instanceId: i.id, reason })).instance)} done="Instance stopping" />
        </Gate>
      )}
      {!TERMINAL.includes(i.state) && (
        <Gate method={InstanceService.method.terminateInstance} ownerId={i.ownerId}>
          <ActionButton
            small={sm}
            danger
            label={i.state === InstanceState.PENDING || i.state === InstanceState.SCHEDULED ? "Cancel" : "Terminate"}
            testId="terminate-instance"
            askReason
            confirm={i.state === InstanceState.PENDING || i.state === InstanceState.SCHEDULED ? "Cancel this booking?" : `Terminate this instance? The lab is stopped and removed${isAdmin ? " (admins terminate at once)" : ""}.`}
            run={async (reason) => store.putInstance((await api.call(InstanceService.method.terminateInstance, { instanceId: i.id, reason: reason || "manual", force: isAdmin && ![InstanceState.PENDING, InstanceState.SCHEDULED].includes(i.state) })).instance)}
            done="Termination requested"
          />
        </Gate>
      )}
    </span>
  );
}

/** `<input type=datetime-local>` value ↔ Date. */
function toLocalInput(d: Date): string {
  const pad = (n: number) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

export function CreateBooking({ onClose, definitionId: initialDef }: { onClose: () => void; definitionId?: string }) {
  const session = useSession();
  const defs = useAsync(
    (signal) =>
      listAll(async (pageToken) => {
        const r = await api.call(DefinitionService.method.listDefinitions, { pageSize: 500, pageToken, statuses: [DefinitionStatus.ACTIVE] }, { signal });
        return { items: r.definitions, next: r.nextPageToken };
      }),
    [],
  );
  const [definitionId, setDef] = useState(initialDef ?? "");
  const [asap, setAsap] = useState(true);
  const [start, setStart] = useState(() => toLocalInput(new Date(Date.now() + 3_600_000)));
  const [end, setEnd] = useState("");
  const [ownerId, setOwner] = useState("");
  const [reservationId, setRes] = useState("");
  const [busy, setBusy] = useState(false);
  const [err, setErr] = useState<ApiError | undefined>();
  const def = defs.data?.find((d) => d.id === definitionId);
  const maxDur = def ? durationSeconds(def.maxDuration) : 0;
  const bookForOthers = session?.roles.some((r) => r === "admin" || r === "manager") ?? false;
  const submit = async () => {
    setBusy(true);
    setErr(undefined);
    try {
      const slot = asap
        ? { asap: true, ...(end ? { end: timestampFromDate(new Date(end)) } : {}) }
        : { asap: false, start: timestampFromDate(new Date(start)), ...(end ? { end: timestampFromDate(new Date(end)) } : {}) };
      const r = await api.call(InstanceService.method.createInstance, { definitionId, timeSlot: slot, ownerId, reservationId, requestId: crypto.randomUUID() });
      store.putInstance(r.instance);
      toast("Booking created");
      onClose();
      if (r.instance) navigate(`/instances/${r.instance.id}`);
    } catch (e) {
      setErr(e instanceof ApiError ? e : new ApiError(0, "Error", String(e)));
    } finally {
      setBusy(false);
    }
  };
  return (
    <Modal
      title="New booking"
      onClose={onClose}
      footer={
        <>
          <button class="btn btn-ghost" onClick={onClose}>
            Cancel
          </button>
          <button class="btn btn-primary" data-testid="submit-booking" disabled={busy || !definitionId} onClick={() => void submit()}>
            {busy ? "Booking…" : "Book"}
          </button>
        </>
      }
    >
      <ErrorBox error={defs.error} onRetry={defs.reload} />
      <Field label="Definition" error={err?.violationFor("definition_id")}>
        <select value={definitionId} onChange={(e) => setDef(e.currentTarget.value)} data-testid="booking-definition">
          <option value="">{defs.loading ? "Loading…" : "Choose…"}</option>
          {(defs.data ?? []).map((d) => (
            <option key={d.id} value={d.id}>
              {d.name} {d.version}
            </option>
          ))}
        </select>
      </Field>
      {def && (
        <p class="muted small">
          {def.nodeCount} nodes · {def.resourceRequirements?.cpuCores ?? 0} CPU · {def.resourceRequirements?.memoryGb ?? 0} GiB · at most {fmtSeconds(maxDur)}
        </p>
      )}
      <div class="seg">
        <button class={asap ? "active" : ""} aria-pressed={asap} onClick={() => setAsap(true)} data-testid="slot-asap">
          As soon as possible
        </button>
        <button class={!asap ? "active" : ""} aria-pressed={!asap} onClick={() => setAsap(false)} data-testid="slot-timed">
          Time slot
        </button>
      </div>
      {!asap && (
        <Field label="Start" error={err?.violationFor("time_slot.start")}>
          <input type="datetime-local" value={start} onInput={(e) => setStart(e.currentTarget.value)} />
        </Field>
      )}
      <Field label="End" hint={`empty = start + ${maxDur ? fmtSeconds(maxDur) : "max duration"}`} error={err?.violationFor("time_slot.end") ?? err?.violationFor("time_slot")}>
        <input type="datetime-local" value={end} onInput={(e) => setEnd(e.currentTarget.value)} />
      </Field>
      {bookForOthers && (
        <Field label="Owner (subject)" hint="empty books for yourself" error={err?.violationFor("owner_id")}>
          <input value={ownerId} onInput={(e) => setOwner(e.currentTarget.value)} />
        </Field>
      )}
      <Field label="Reservation id" hint="external exam/session booking reference (optional)" error={err?.violationFor("reservation_id")}>
        <input value={reservationId} onInput={(e) => setRes(e.currentTarget.value)} />
      </Field>
      <ErrorBox error={err} />
    </Modal>
  );
}

export function InstancesPage({ create, definitionId }: { create: boolean; definitionId: string }) {
  const s = useStore();
  const session = useSession();
  const [state, setState] = useState(0);
  const [q, setQ] = useState("");
  const [mine, setMine] = useState(false);
  const [withTerminated, setWithTerminated] = useState(false);
  const [creating, setCreating] = useState(create);
  const terminated = useAsync(
    async (signal) => (withTerminated ? (await api.call(InstanceService.method.listInstances, { pageSize: 200, states: [InstanceState.TERMINATED] }, { signal })).instances : []),
    [withTerminated],
  );
  if (!s.loaded && s.loadError) return <ErrorBox error={s.loadError} onRetry={() => void s.reload()} />;
  if (!s.loaded) return <Spinner label="Loading instances…" />;
  const workerName = (id: string) => s.workers.get(id)?.name ?? id.slice(0, 8);
  const all = [...s.instances.values(), ...(terminated.data ?? []).filter((i) => !s.instances.has(i.id))];
  const needle = q.toLowerCase();
  const list = all
    .filter((i) => (state ? i.state === state : true))
    .filter((i) => (mine ? i.ownerId === session?.subject : true))
    .filter((i) => !needle || [i.id, i.definitionName, i.ownerId, i.reservationId, workerName(i.workerId)].some((x) => x.toLowerCase().includes(needle)))
    .sort((a, b) => Number((a.timeSlot?.start?.seconds ?? 0n) - (b.timeSlot?.start?.seconds ?? 0n)));
  return (
    <div class="page" data-testid="page-instances">
      <div class="page-head">
        <h1>Instances</h1>
        <div class="page-actions">
          {can(session, InstanceService.method.createInstance) && (
            <button class="btn btn-primary" data-testid="new-booking" onClick={() => setCreating(true)}>
              New booking
            </button>
          )}
        </div>
      </div>
      {creating && (
        <CreateBooking
          definitionId={definitionId}
          onClose={() => {
            setCreating(false);
            if (create) navigate("/instances");
          }}
        />
      )}
      <Card>
        <div class="filters">
          <input type="search" placeholder="Search id, definition, owner, worker, reservation" value={q} onInput={(e) => setQ(e.currentTarget.value)} aria-label="Search instances" />
          <EnumSelect e={InstanceState} value={state} onChange={setState} anyLabel="Any state" aria-label="State" />
          <label class="check">
            <input type="checkbox" checked={mine} onChange={(e) => setMine(e.currentTarget.checked)} /> Mine only
          </label>
          <label class="check">
            <input type="checkbox" checked={withTerminated} onChange={(e) => setWithTerminated(e.currentTarget.checked)} /> Include terminated
          </label>
        </div>
        <ErrorBox error={terminated.error} />
        {list.length === 0 ? (
          <Empty>No instance matches.</Empty>
        ) : (
          <div class="table-wrap">
            <table class="table" data-testid="instances-table">
              <thead>
                <tr>
                  <th>Definition</th>
                  <th>State</th>
                  <th>Slot</th>
                  <th>Worker</th>
                  <th>Owner</th>
                  <th>Notes</th>
                  <th />
                </tr>
              </thead>
              <tbody>
                {list.map((i) => (
                  <tr key={i.id} data-instance={i.id}>
                    <td>
                      <a href={`#/instances/${i.id}`}>{i.definitionName || i.definitionId.slice(0, 8)}</a> <span class="muted small">{i.definitionVersion}</span>
                      <div class="muted small">{i.id.slice(0, 8)}</div>
                    </td>
                    <td>
                      <InstanceStateBadge state={i.state} />
                    </td>
                    <td class="small">
                      {i.timeSlot?.asap && <span class="badge badge-info">ASAP</span>} {fmtTime(i.timeSlot?.start)} → {fmtTime(i.timeSlot?.end)}
                    </td>
                    <td>{i.workerId ? <a href={`#/workers/${i.workerId}`}>{workerName(i.workerId)}</a> : <span class="muted">—</span>}</td>
                    <td class="small">{i.ownerId}</td>
                    <td class="small">{i.state === InstanceState.PENDING ? <span class="why">{whyPending(i)}</span> : i.terminationReason || (i.retryCount ? `${i.retryCount} retries` : "")}</td>
                    <td>
                      <InstanceActions i={i} small />
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
