// The booking time line: one row per worker, one bar per booking (reserved
// window = slot start − lead time … slot end), lanes for overlaps, and the
// worker's booked capacity as a step chart underneath.

import { InstanceState } from "../gen/ccm/v1/instance_pb";
import type { GetWorkerCapacityResponse, WorkerBooking } from "../gen/ccm/v1/worker_pb";
import { enumLabel, fmtTime, toDate } from "../lib/format";
import { layoutBars, stepAreaPath, ticks, xOf } from "../lib/timeline";
import { instanceTone } from "./kit";

/** Height of one lane, px. */
export const LANE_PX = 22;
/** Height of the capacity strip, px. */
export const STRIP_PX = 16;
/** Width of the label column, px. */
export const LABEL_PX = 170;

function span(b: WorkerBooking): { start: number; end: number } {
  return { start: toDate(b.reservedWindow?.start)?.getTime() ?? 0, end: toDate(b.reservedWindow?.end)?.getTime() ?? 0 };
}

export interface GanttRow {
  id: string;
  label: string;
  capacity: GetWorkerCapacityResponse | undefined;
}

export function Gantt({ rows, start, end, width, now = Date.now() }: { rows: GanttRow[]; start: number; end: number; width: number; now?: number }) {
  const plot = Math.max(200, width - LABEL_PX);
  const tks = ticks(start, end, Math.max(2, Math.floor(plot / 90)));
  const dayChange = end - start > 24 * 3_600_000;
  const nowX = xOf(now, start, end, plot);
  return (
    <div class="gantt" data-testid="gantt">
      <svg width={LABEL_PX + plot} height={24} class="gantt-axis">
        {tks.map((t) => {
          const x = LABEL_PX + xOf(t, start, end, plot);
          const d = new Date(t);
          const label = dayChange && d.getHours() === 0 ? d.toLocaleDateString(undefined, { month: "short", day: "numeric" }) : d.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
          return (
            <g key={t}>
              <line x1={x} x2={x} y1={16} y2={24} class="tick" />
              <text x={x + 3} y={12} class="tick-label">
                {label}
              </text>
            </g>
          );
        })}
      </svg>
      {rows.map((r) => {
        const bookings = r.capacity?.bookings ?? [];
        const { bars, lanes } = layoutBars(bookings, span, start, end, plot);
        const h = Math.max(1, lanes) * LANE_PX + STRIP_PX + 6;
        const declaredNodes = r.capacity?.declared?.maxNodes ?? 0;
        const declaredCpu = r.capacity?.declared?.cpuCores ?? 0;
        const steps = (r.capacity?.timeLine ?? []).map((s) => ({
          start: toDate(s.start)?.getTime() ?? 0,
          end: toDate(s.end)?.getTime() ?? 0,
          used: Math.max(declaredCpu ? (s.allocated?.cpuCores ?? 0) / declaredCpu : 0, declaredNodes ? (s.allocated?.maxNodes ?? 0) / declaredNodes : 0),
        }));
        return (
          <div class="gantt-row" key={r.id} data-testid="gantt-row" data-worker={r.label}>
            <div class="gantt-label" style={{ width: `${LABEL_PX}px` }}>
              <a href={`#/workers/${r.id}`}>{r.label}</a>
              <div class="muted small">{bookings.length} booking(s)</div>
            </div>
            <svg width={plot} height={h} class="gantt-plot" role="img" aria-label={`Bookings of ${r.label}`}>
              {tks.map((t) => (
                <line key={t} x1={xOf(t, start, end, plot)} x2={xOf(t, start, end, plot)} y1={0} y2={h} class="grid" />
              ))}
              {bars.map((b) => {
                const bk = b.item;
                const tone = instanceTone(bk.state);
                return (
                  <a key={bk.instanceId} href={`#/instances/${bk.instanceId}`}>
                    <rect x={b.x} y={b.lane * LANE_PX + 2} width={b.width} height={LANE_PX - 4} rx={3} class={`bar seg-${tone}${b.clippedLeft ? " clip-l" : ""}${b.clippedRight ? " clip-r" : ""}`} data-testid="gantt-bar">
                      <title>
                        {`${bk.definitionName || bk.definitionId} · ${enumLabel(InstanceState, bk.state)}\n${fmtTime(bk.reservedWindow?.start)} → ${fmtTime(bk.reservedWindow?.end)}\nowner ${bk.ownerId}\n${bk.reserved?.cpuCores ?? 0} CPU · ${bk.reserved?.memoryGb ?? 0} GiB · ${bk.reserved?.maxNodes ?? 0} nodes`}
                      </title>
                    </rect>
                    {b.width > 70 && (
                      <text x={b.x + 4} y={b.lane * LANE_PX + 15} class="bar-label">
                        {(bk.definitionName || bk.instanceId).slice(0, Math.floor(b.width / 7))}
                      </text>
                    )}
                  </a>
                );
              })}
              <g transform={`translate(0, ${Math.max(1, lanes) * LANE_PX + 4})`}>
                <rect x={0} y={0} width={plot} height={STRIP_PX} class="strip-bg" />
                <path d={stepAreaPath(steps, start, end, plot, STRIP_PX)} class="strip" />
              </g>
              {nowX >= 0 && nowX <= plot && <line x1={nowX} x2={nowX} y1={0} y2={h} class="now" />}
            </svg>
          </div>
        );
      })}
    </div>
  );
}
