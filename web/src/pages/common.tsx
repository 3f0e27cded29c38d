// Pieces shared by several pages.

import type { PendingSummary } from "../gen/ccm/v1/placement_pb";
import { RejectionCode } from "../gen/ccm/v1/placement_pb";
import { ConditionStatus, type Condition } from "../gen/ccm/v1/common_pb";
import type { LabletInstance } from "../gen/ccm/v1/instance_pb";
import { ScalingAction, type ScalingDecision } from "../gen/ccm/v1/scaling_pb";
import type { WorkerCapacity } from "../gen/ccm/v1/common_pb";
import { enumLabel, fmtAgo, fmtTime } from "../lib/format";
import { Badge, type Tone } from "../ui/kit";

/** The "why pending" line of an instance: the scheduler summary, else the Scheduled condition. */
export function whyPending(i: LabletInstance): string {
  if (i.pendingSummary?.message) return i.pendingSummary.message;
  const c = i.conditions.find((x) => x.type === "Scheduled" && x.status !== ConditionStatus.TRUE);
  if (c?.message) return c.message;
  if (c?.reason) return c.reason;
  return "waiting for the scheduler";
}

/** Per-filter rejection counts as small badges. */
export function RejectionChips({ summary }: { summary: PendingSummary | undefined }) {
  if (!summary || summary.rejections.length === 0) return null;
  return (
    <span class="chips">
      {summary.rejections.map((r) => (
        <Badge key={r.code} tone="warn" title={RejectionCode[r.code]}>
          {r.count} {enumLabel(RejectionCode, r.code).toLowerCase()}
        </Badge>
      ))}
      {summary.scaleUpTemplate && <Badge tone="info">scale-up: {summary.scaleUpTemplate}{summary.scaleUpInFlight ? " (in flight)" : ""}</Badge>}
    </span>
  );
}

/** Conditions as a table. */
export function Conditions({ conditions }: { conditions: Condition[] }) {
  if (conditions.length === 0) return <p class="muted">No conditions.</p>;
  return (
    <table class="table compact">
      <thead>
        <tr>
          <th>Type</th>
          <th>Status</th>
          <th>Reason</th>
          <th>Message</th>
          <th>Since</th>
        </tr>
      </thead>
      <tbody>
        {conditions.map((c) => (
          <tr key={c.type}>
            <td>{c.type}</td>
            <td>
              <Badge tone={c.status === ConditionStatus.TRUE ? "ok" : c.status === ConditionStatus.FALSE ? "warn" : "muted"}>{enumLabel(ConditionStatus, c.status)}</Badge>
            </td>
            <td>{c.reason}</td>
            <td>{c.message}</td>
            <td title={fmtTime(c.lastTransitionAt)}>{fmtAgo(c.lastTransitionAt)}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

/** Tone of a scaling action. */
export function actionTone(a: ScalingAction): Tone {
  switch (a) {
    case ScalingAction.SCALE_UP:
    case ScalingAction.RESTART_STOPPED:
      return "info";
    case ScalingAction.DRAIN:
    case ScalingAction.STOP:
      return "warn";
    case ScalingAction.FORCE_STOP:
    case ScalingAction.TERMINATE:
    case ScalingAction.HALT:
      return "bad";
    case ScalingAction.CANCEL_DRAIN:
    case ScalingAction.RESUME:
      return "ok";
    default:
      return "muted";
  }
}

/** One scaling decision as a list line. */
export function DecisionLine({ d, workerName }: { d: ScalingDecision; workerName?: string }) {
  return (
    <li class="decision" data-testid="decision">
      <Badge tone={actionTone(d.action)}>{enumLabel(ScalingAction, d.action)}</Badge>{" "}
      {d.count > 1 && <strong>×{d.count} </strong>}
      {d.templateName && <span class="muted">{d.templateName} </span>}
      {d.workerId && <a href={`#/workers/${d.workerId}`}>{workerName || d.workerId.slice(0, 8)}</a>} <span>{d.reason || d.reasonCode}</span>{" "}
      <span class="muted small" title={fmtTime(d.at)}>
        {fmtAgo(d.at)}
      </span>
    </li>
  );
}

/** A plain capacity sum. */
export interface CapSum {
  cpuCores: number;
  memoryGb: number;
  storageGb: number;
  maxNodes: number;
}

/** Sums capacities. */
export function addCap(a: CapSum | undefined, b: CapSum | undefined): CapSum {
  return {
    cpuCores: (a?.cpuCores ?? 0) + (b?.cpuCores ?? 0),
    memoryGb: (a?.memoryGb ?? 0) + (b?.memoryGb ?? 0),
    storageGb: (a?.storageGb ?? 0) + (b?.storageGb ?? 0),
    maxNodes: (a?.maxNodes ?? 0) + (b?.maxNodes ?? 0),
  };
}

/** "4 CPU · 16 GiB · 50 GiB · 5 nodes". */
export function capText(c: WorkerCapacity | undefined): string {
  if (!c) return "—";
  return `${c.cpuCores} CPU · ${c.memoryGb} GiB mem · ${c.storageGb} GiB disk · ${c.maxNodes} nodes`;
}
