// The booking time line: a Gantt of reservations per worker over the coming
// hours or days, from WorkerService.GetWorkerCapacity.

import { useEffect, useRef, useState } from "preact/hooks";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { WorkerState } from "../gen/ccm/v1/worker_pb";
import { InstanceState } from "../gen/ccm/v1/instance_pb";
import { WorkerService, api } from "../api/services";
import { enumLabel } from "../lib/format";
import { Card, Empty, ErrorBox, Spinner } from "../ui/kit";
import { useAsync, useStore } from "../ui/hooks";
import { Gantt, type GanttRow } from "../ui/Gantt";

/** Capacity requests in flight at once. */
export const TIMELINE_CONCURRENCY = 6;
/** How far back the window starts, so just-started bookings show. */
export const TIMELINE_LOOKBACK_MS = 3_600_000;

/** Runs `fn` over `items` with at most `limit` promises pending. */
export async function mapLimit<T, R>(items: readonly T[], limit: number, fn: (t: T) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const n = next++;
      out[n] = await fn(items[n]!);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}

const LEGEND = [InstanceState.SCHEDULED, InstanceState.INSTANTIATING, InstanceState.RUNNING, InstanceState.COLLECTING, InstanceState.STOPPED];

export function TimelinePage() {
  const s = useStore();
  const [hours, setHours] = useState(24);
  const [all, setAll] = useState(false);
  const box = useRef<HTMLDivElement>(null);
  const [width, setWidth] = useState(1000);
  useEffect(() => {
    const el = box.current;
    if (!el) return;
    const ro = new ResizeObserver(() => setWidth(el.clientWidth));
    ro.observe(el);
    return () => ro.disconnect();
  }, []);
  const [anchor, setAnchor] = useState(() => Date.now() - TIMELINE_LOOKBACK_MS);
  const start = anchor;
  const end = start + hours * 3_600_000;
  const workers = [...s.workers.values()]
    .filter((w) => all || w.state === WorkerState.RUNNING || w.state === WorkerState.DRAINING || w.instanceIds.length > 0)
    .sort((a, b) => a.name.localeCompare(b.name));
  const key = workers.map((w) => `${w.id}:${w.instanceIds.length}`).join(",");
  const rows = useAsync(
    (signal) =>
      mapLimit(workers, TIMELINE_CONCURRENCY, async (w): Promise<GanttRow> => {
        const c = await api.call(WorkerService.method.getWorkerCapacity, { workerId: w.id, windowStart: timestampFromDate(new Date(start)), windowEnd: timestampFromDate(new Date(end)) }, { signal });
        return { id: w.id, label: w.name, capacity: c };
      }),
    [key, start, end],
  );
  return (
    <div class="page" data-testid="page-timeline">
      <div class="page-head">
        <h1>Booking time line</h1>
        <div class="page-actions">
          <select value={String(hours)} onChange={(e) => setHours(Number(e.currentTarget.value))} aria-label="Window length">
            <option value="6">Next 6 hours</option>
            <option value="24">Next 24 hours</option>
            <option value="72">Next 3 days</option>
            <option value="168">Next 7 days</option>
            <option value="336">Next 14 days</option>
          </select>
          <label class="check">
            <input type="checkbox" checked={all} onChange={(e) => setAll(e.currentTarget.checked)} /> All workers
          </label>
          <button class="btn btn-ghost" onClick={() => setAnchor(Date.now() - TIMELINE_LOOKBACK_MS)}>
            Now
          </button>
        </div>
      </div>
      <Card>
        <div class="legend-row small">
          {LEGEND.map((st) => (
            <span key={st}>
              <span class={`legend-dot seg-${st === InstanceState.RUNNING ? "ok" : st === InstanceState.COLLECTING ? "accent" : st === InstanceState.STOPPED ? "neutral" : "info"}`} /> {enumLabel(InstanceState, st)}
            </span>
          ))}
          <span>
            <span class="legend-dot strip-dot" /> booked share of CPU/nodes (the higher)
          </span>
          <span>
            <span class="legend-dot now-dot" /> now
          </span>
        </div>
        <div ref={box} class="gantt-box">
          {!s.loaded ? (
            <Spinner />
          ) : workers.length === 0 ? (
            <Empty>No worker in service. Tick "All workers" to see the others.</Empty>
          ) : rows.error ? (
            <ErrorBox error={rows.error} onRetry={rows.reload} />
          ) : !rows.data ? (
            <Spinner label="Loading bookings…" />
          ) : (
            <Gantt rows={rows.data} start={start} end={end} width={width} />
          )}
        </div>
        <p class="muted small">Each bar is the window a booking reserves: slot start minus the lead time (worker boot + lab instantiation) until slot end.</p>
      </Card>
    </div>
  );
}
