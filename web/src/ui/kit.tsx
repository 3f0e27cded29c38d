// The UI kit: badges, meters, tables, modals, toasts, confirm-and-run
// buttons, error boxes and role gates.

import type { DescMethod } from "@bufbuild/protobuf";
import type { ComponentChildren, JSX } from "preact";
import { useEffect, useState } from "preact/hooks";
import { ApiError, type FieldViolation } from "../api/errors";
import { can } from "../api/session";
import { InstanceState } from "../gen/ccm/v1/instance_pb";
import { WorkerState } from "../gen/ccm/v1/worker_pb";
import { enumLabel } from "../lib/format";
import { useSession } from "./hooks";

/** Colour families of badges. */
export type Tone = "ok" | "warn" | "bad" | "info" | "neutral" | "muted" | "accent";

export function Badge({ tone = "neutral", children, title }: { tone?: Tone; children: ComponentChildren; title?: string }) {
  return (
    <span class={`badge badge-${tone}`} title={title}>
      {children}
    </span>
  );
}

/** Badge tone of a worker state. */
export function workerTone(s: WorkerState): Tone {
  switch (s) {
    case WorkerState.RUNNING:
      return "ok";
    case WorkerState.DRAINING:
      return "warn";
    case WorkerState.PENDING:
    case WorkerState.PROVISIONING:
    case WorkerState.STARTING:
      return "info";
    case WorkerState.STOPPING:
    case WorkerState.STOPPED:
      return "neutral";
    case WorkerState.FAILED:
    case WorkerState.UNKNOWN:
      return "bad";
    default:
      return "muted";
  }
}

/** Badge tone of an instance state. */
export function instanceTone(s: InstanceState): Tone {
  switch (s) {
    case InstanceState.PENDING:
      return "warn";
    case InstanceState.SCHEDULED:
    case InstanceState.INSTANTIATING:
      return "info";
    case InstanceState.RUNNING:
      return "ok";
    case InstanceState.COLLECTING:
    case InstanceState.GRADING:
      return "accent";
    case InstanceState.STOPPING:
    case InstanceState.STOPPED:
      return "neutral";
    default:
      return "muted";
  }
}

export function WorkerStateBadge({ state }: { state: WorkerState }) {
  return (
    <Badge tone={workerTone(state)}>
      <span data-state={WorkerState[state]}>{enumLabel(WorkerState, state)}</span>
    </Badge>
  );
}

export function InstanceStateBadge({ state }: { state: InstanceState }) {
  return (
    <Badge tone={instanceTone(state)}>
      <span data-state={InstanceState[state]}>{enumLabel(InstanceState, state)}</span>
    </Badge>
  );
}

/** A horizontal bar: used / total. */
export function Meter({ used, total, label, unit = "" }: { used: number; total: number; label?: string; unit?: string }) {
  const p = total > 0 ? Math.max(0, Math.min(100, (used / total) * 100)) : 0;
  const tone = p >= 90 ? "bad" : p >= 70 ? "warn" : "ok";
  return (
    <div class="meter" title={`${used}${unit} of ${total}${unit}`}>
      {label && <span class="meter-label">{label}</span>}
      <span class="meter-track">
        <span class={`meter-fill meter-${tone}`} style={{ width: `${p}%` }} />
      </span>
      <span class="meter-text">
        {used}/{total}
        {unit}
      </span>
    </div>
  );
}

/** A percentage bar (0..100). */
export function PercentBar({ value, label }: { value: number; label?: string }) {
  return <Meter used={Math.round(value)} total={100} unit="%" {...(label ? { label } : {})} />;
}

export function Spinner({ label = "Loading…" }: { label?: string }) {
  return (
    <div class="loading" role="status" aria-live="polite">
      <span class="spinner" aria-hidden="true" /> {label}
    </div>
  );
}

/** An error message with an optional retry button. */
export function ErrorBox({ error, onRetry }: { error: ApiError | Error | undefined; onRetry?: () => void }) {
  if (!error) return null;
  const e = error instanceof ApiError ? error : new ApiError(0, "Error", error.message);
  return (
    <div class="error-box" role="alert" data-kind={e.kind}>
      <strong>{e.describe()}</strong>
      {e.requestId && <div class="muted small">request id {e.requestId}</div>}
      {onRetry && (
        <button class="btn btn-small" onClick={onRetry}>
          Retry
        </button>
      )}
    </div>
  );
}

/** Renders children only when the session may call `method` (on `ownerId`'s resource). */
export function Gate({ method, ownerId, children }: { method: DescMethod; ownerId?: string; children: ComponentChildren }) {
  const session = useSession();
  return can(session, method, ownerId) ? <>{children}</> : null;
}

export function Modal({ title, onClose, children, footer, wide }: { title: string; onClose: () => void; children: ComponentChildren; footer?: ComponentChildren; wide?: boolean }) {
  useEffect(() => {
    const on = (e: KeyboardEvent) => e.key === "Escape" && onClose();
    window.addEventListener("keydown", on);
    return () => window.removeEventListener("keydown", on);
  }, [onClose]);
  return (
    <div class="modal-backdrop" onClick={(e) => e.target === e.currentTarget && onClose()}>
      <div class={`modal${wide ? " modal-wide" : ""}`} role="dialog" aria-modal="true" aria-label={title}>
        <header class="modal-head">
          <h2>{title}</h2>
          <button class="btn-icon" aria-label="Close" onClick={onClose}>
            ×
          </button>
        </header>
        <div class="modal-body">{children}</div>
        {footer && <footer class="modal-foot">{footer}</footer>}
      </div>
    </div>
  );
}

// ---- toasts ----

/** One toast. */
export interface Toast {
  id: number;
  tone: Tone;
  text: string;
}
let toasts: Toast[] = [];
let toastSeq = 0;
const toastListeners = new Set<() => void>();

/** Shows a toast for a few seconds. */
export function toast(text: string, tone: Tone = "ok"): void {
  const t = { id: ++toastSeq, tone, text };
  toasts = [...toasts, t].slice(-5);
  toastListeners.forEach((l) => l());
  setTimeout(() => {
    toasts = toasts.filter((x) => x.id !== t.id);
    toastListeners.forEach((l) => l());
  }, tone === "bad" ? 9000 : 4500);
}

/** Shows an error as a toast. */
export function toastError(e: unknown): void {
  toast(e instanceof ApiError ? e.describe() : e instanceof Error ? e.message : String(e), "bad");
}

export function Toasts() {
  const [, set] = useState(0);
  useEffect(() => {
    const l = () => set((n) => n + 1);
    toastListeners.add(l);
    return () => toastListeners.delete(l);
  }, []);
  return (
    <div class="toasts" aria-live="polite">
      {toasts.map((t) => (
        <div key={t.id} class={`toast toast-${t.tone}`} role={t.tone === "bad" ? "alert" : "status"}>
          {t.text}
        </div>
      ))}
    </div>
  );
}

/**
 * A button that runs an async action, optionally after a confirmation with
 * an optional reason, shows progress, and reports success or the error.
 */
export function ActionButton({
  label,
  run,
  confirm,
  askReason,
  danger,
  done,
  small,
  testId,
}: {
  label: string;
  run: (reason: string) => Promise<unknown>;
  confirm?: string;
  askReason?: boolean;
  danger?: boolean;
  done?: string;
  small?: boolean;
  testId?: string;
}) {
  const [busy, setBusy] = useState(false);
  const [asking, setAsking] = useState(false);
  const [reason, setReason] = useState("");
  const [error, setError] = useState<ApiError | undefined>();
  const go = async () => {
    setBusy(true);
    setError(undefined);
    try {
      await run(reason);
      setAsking(false);
      toast(done ?? `${label}: done`);
    } catch (e) {
      const err = e instanceof ApiError ? e : new ApiError(0, "Error", String(e));
      if (asking) setError(err);
      else toastError(err);
    } finally {
      setBusy(false);
    }
  };
  const cls = `btn${danger ? " btn-danger" : ""}${small ? " btn-small" : ""}`;
  return (
    <>
      <button class={cls} disabled={busy} data-testid={testId} onClick={() => (confirm || askReason ? setAsking(true) : void go())}>
        {busy ? "…" : label}
      </button>
      {asking && (
        <Modal
          title={label}
          onClose={() => !busy && setAsking(false)}
          footer={
            <>
              <button class="btn btn-ghost" disabled={busy} onClick={() => setAsking(false)}>
                Cancel
              </button>
              <button class={`btn${danger ? " btn-danger" : " btn-primary"}`} disabled={busy} data-testid="confirm" onClick={() => void go()}>
                {busy ? "Working…" : label}
              </button>
            </>
          }
        >
          {confirm && <p>{confirm}</p>}
          {askReason && (
            <label class="field">
              <span>Reason (recorded in the audit log)</span>
              <input value={reason} onInput={(e) => setReason(e.currentTarget.value)} placeholder="optional" />
            </label>
          )}
          <ErrorBox error={error} />
        </Modal>
      )}
    </>
  );
}

/** A labelled form field with its server-side violation. */
export function Field({ label, error, hint, children }: { label: string; error?: FieldViolation | undefined; hint?: string; children: ComponentChildren }) {
  return (
    <label class={`field${error ? " field-invalid" : ""}`}>
      <span>{label}</span>
      {children}
      {hint && !error && <small class="muted">{hint}</small>}
      {error && <small class="field-error">{error.description}</small>}
    </label>
  );
}

/** A key/value list. */
export function KV({ rows }: { rows: [string, ComponentChildren][] }) {
  return (
    <dl class="kv">
      {rows.map(([k, v]) => (
        <div key={k}>
          <dt>{k}</dt>
          <dd>{v === "" || v === undefined || v === null ? "—" : v}</dd>
        </div>
      ))}
    </dl>
  );
}

/** A titled panel. */
export function Card({ title, actions, children, class: cls }: { title?: ComponentChildren; actions?: ComponentChildren; children: ComponentChildren; class?: string }) {
  return (
    <section class={`card${cls ? ` ${cls}` : ""}`}>
      {(title || actions) && (
        <header class="card-head">
          {title && <h3>{title}</h3>}
          {actions && <div class="card-actions">{actions}</div>}
        </header>
      )}
      {children}
    </section>
  );
}

/** A number tile for the dashboard. */
export function Stat({ label, value, sub, tone }: { label: string; value: ComponentChildren; sub?: ComponentChildren; tone?: Tone }) {
  return (
    <div class={`stat${tone ? ` stat-${tone}` : ""}`}>
      <div class="stat-value">{value}</div>
      <div class="stat-label">{label}</div>
      {sub && <div class="stat-sub">{sub}</div>}
    </div>
  );
}

/** Tabs. */
export function Tabs<K extends string>({ tabs, active, onChange }: { tabs: [K, string][]; active: K; onChange: (k: K) => void }) {
  return (
    <div class="tabs" role="tablist">
      {tabs.map(([k, label]) => (
        <button key={k} role="tab" aria-selected={k === active} class={`tab${k === active ? " tab-active" : ""}`} onClick={() => onChange(k)}>
          {label}
        </button>
      ))}
    </div>
  );
}

/** An empty-state line. */
export function Empty({ children }: { children: ComponentChildren }) {
  return <p class="empty">{children}</p>;
}

/** `<select>` of a generated enum (UNSPECIFIED shown as `anyLabel`). */
export function EnumSelect({ e, value, onChange, anyLabel = "Any", exclude = [], ...rest }: { e: Record<number, string>; value: number; onChange: (v: number) => void; anyLabel?: string; exclude?: number[] } & Omit<JSX.HTMLAttributes<HTMLSelectElement>, "value" | "onChange">) {
  const values = Object.keys(e)
    .map(Number)
    .filter((n) => !Number.isNaN(n) && !exclude.includes(n));
  return (
    <select {...rest} value={String(value)} onChange={(ev) => onChange(Number(ev.currentTarget.value))}>
      {values.map((v) => (
        <option key={v} value={String(v)}>
          {v === 0 ? anyLabel : enumLabel(e, v)}
        </option>
      ))}
    </select>
  );
}
