// The live view of the fleet shared by the pages: workers, active
// instances and recent scaling decisions, loaded with the list RPCs and kept
// current by the SSE change feed. The feed is level-triggered from the UI's
// point of view: every fresh (non-resumed) connection and every WatchReset
// re-lists, so a dropped event can never leave the view stale for long.

import type { CmlWorker } from "../gen/ccm/v1/worker_pb";
import { WorkerState } from "../gen/ccm/v1/worker_pb";
import { InstanceState, type LabletInstance } from "../gen/ccm/v1/instance_pb";
import type { ScalingDecision } from "../gen/ccm/v1/scaling_pb";
import { ChangeType, ResourceKind, type ChangeEvent, type WatchEventsResponse } from "../gen/ccm/v1/event_pb";
import { ApiError } from "./errors";
import { ControllerService, EventService, InstanceService, WorkerService, api, listAll } from "./services";
import { LiveFeed, type FeedStatus } from "./sse";
import { bindingOf } from "./transcode";
import { loginUrl } from "./client";

/** The SSE path the gateway serves (brief: `/v1/events:stream`); the WatchEvents rule path is the fallback. */
export const SSE_PATHS = ["/v1/events:stream", bindingOf(EventService.method.watchEvents).template];
/**
 * Bookmark interval asked of the watch. The gateway answers the SSE request
 * once the first item arrives, so a short interval makes an idle feed show
 * "Live" quickly and lets the client notice a dead connection.
 */
export const FEED_HEARTBEAT = "2s";
/** Scaling decisions kept in memory for the dashboard. */
export const MAX_DECISIONS = 100;
/** Debounce of the per-worker re-read after a change event (the feed's worker lacks computed capacity). */
export const WORKER_REFRESH_DEBOUNCE_MS = 400;
/** States of instances the live view keeps. */
export const ACTIVE_INSTANCE_STATES = [
  InstanceState.PENDING,
  InstanceState.SCHEDULED,
  InstanceState.INSTANTIATING,
  InstanceState.RUNNING,
  InstanceState.COLLECTING,
  InstanceState.GRADING,
  InstanceState.STOPPING,
  InstanceState.STOPPED,
  InstanceState.ARCHIVED,
];

/** One line of the recent-activity list. */
export interface Activity {
  at: Date;
  kind: ResourceKind;
  type: ChangeType;
  id: string;
  text: string;
}

type Listener = () => void;

/** The shared live store. */
export class LiveStore {
  workers = new Map<string, CmlWorker>();
  instances = new Map<string, LabletInstance>();
  decisions: ScalingDecision[] = [];
  activity: Activity[] = [];
  feedStatus: FeedStatus = "connecting";
  feedDetail = "";
  loaded = false;
  loading = false;
  loadError: ApiError | undefined;
  decisionsError: ApiError | undefined;
  lastRevision = "";
  eventsSeen = 0;
  /** Bumped on every change; components compare it. */
  version = 0;

  private reloadAgain = false;
  private listeners = new Set<Listener>();
  private pending = false;
  private feed: LiveFeed | undefined;
  private workerTimers = new Map<string, ReturnType<typeof setTimeout>>();

  subscribe(fn: Listener): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  /** Coalesces notifications into one per microtask. */
  notify(): void {
    this.version++;
    if (this.pending) return;
    this.pending = true;
    queueMicrotask(() => {
      this.pending = false;
      for (const l of this.listeners) l();
    });
  }

  /** Starts the feed (and the initial load, through onFresh). */
  start(): void {
    if (this.feed) return;
    this.feed = new LiveFeed({
      paths: SSE_PATHS,
      // No `kinds` filter: the gateway build this was written against keeps only the last of
      // repeated query parameters, so every kind is watched and the others are ignored here.
      query: `heartbeatInterval=${FEED_HEARTBEAT}`,
      onEvent: (ev) => this.onEvent(ev),
      onStatus: (s, d) => {
        this.feedStatus = s;
        this.feedDetail = d ?? "";
        this.notify();
      },
      onFresh: () => void this.reload(),
      onUnauthenticated: () => window.location.assign(loginUrl(window.location.pathname + window.location.hash)),
    });
    this.feed.start();
    // Load at once too, so pages fill even when the feed is slow to open.
    void this.reload();
  }

  /** Reconnects the feed now (badge click). */
  reconnect(): void {
    this.feed?.reconnectNow();
  }

  /** Re-lists workers, active instances and recent scaling decisions. */
  async reload(): Promise<void> {
    if (this.loading) {
      // A re-list asked for while one runs (e.g. the feed opened mid-list) runs again after it,
      // so changes committed during the first list are never missed.
      this.reloadAgain = true;
      return;
    }
    this.loading = true;
    this.notify();
    try {
      const [workers, instances] = await Promise.all([
        listAll(async (pageToken) => {
          const r = await api.call(WorkerService.method.listWorkers, { pageSize: 500, pageToken });
          return { items: r.workers, next: r.nextPageToken };
        }),
        // One list per state: a single request with the repeated `states` filter would be
        // shorter, but the gateway keeps only the last repeated query parameter.
        Promise.all(
          ACTIVE_INSTANCE_STATES.map((state) =>
            listAll(async (pageToken) => {
              const r = await api.call(InstanceService.method.listInstances, { pageSize: 500, pageToken, states: [state] });
              return { items: r.instances, next: r.nextPageToken };
            }),
          ),
        ).then((lists) => lists.flat()),
      ]);
      this.workers = new Map(workers.map((w) => [w.id, w]));
      this.instances = new Map(instances.map((i) => [i.id, i]));
      this.loadError = undefined;
      this.loaded = true;
    } catch (e) {
      this.loadError = e instanceof ApiError ? e : new ApiError(0, "Error", String(e));
    }
    try {
      const d = await api.call(ControllerService.method.listScalingDecisions, { pageSize: 50 });
      this.decisions = d.decisions.slice(0, MAX_DECISIONS);
      this.decisionsError = undefined;
    } catch (e) {
      this.decisionsError = e instanceof ApiError ? e : new ApiError(0, "Error", String(e));
    }
    this.loading = false;
    this.notify();
    if (this.reloadAgain) {
      this.reloadAgain = false;
      await this.reload();
    }
  }

  private onEvent(ev: WatchEventsResponse): void {
    this.eventsSeen++;
    switch (ev.item.case) {
      case "change":
        this.lastRevision = ev.item.value.revision.toString();
        this.applyChange(ev.item.value);
        break;
      case "bookmark":
        this.lastRevision = ev.item.value.revision.toString();
        break;
      case "reset":
        void this.reload();
        break;
      default:
        break;
    }
    this.notify();
  }

  /** Applies one change event to the view. */
  applyChange(c: ChangeEvent): void {
    const at = c.at ? new Date(Number(c.at.seconds) * 1000) : new Date();
    switch (c.resource.case) {
      case "worker": {
        const w = c.resource.value;
        const prev = this.workers.get(c.resourceId);
        if (c.type === ChangeType.DELETED) {
          this.workers.delete(c.resourceId);
        } else {
          // The feed's worker carries no computed capacity: keep the last known
          // figures and re-read the worker shortly.
          if (prev) {
            w.allocatedCapacity ??= prev.allocatedCapacity;
            w.availableCapacity ??= prev.availableCapacity;
            if (w.availablePorts === 0) w.availablePorts = prev.availablePorts;
          }
          this.workers.set(c.resourceId, w);
          this.scheduleWorkerRefresh(c.resourceId);
        }
        if (!prev || prev.state !== w.state) {
          this.pushActivity({ at, kind: c.kind, type: c.type, id: c.resourceId, text: `worker ${w.name || c.resourceId}: ${WorkerState[w.state] ?? "?"}${w.stateReason ? ` (${w.stateReason})` : ""}` });
        }
        break;
      }
      case "instance": {
        const i = c.resource.value;
        const prev = this.instances.get(c.resourceId);
        if (c.type === ChangeType.DELETED) this.instances.delete(c.resourceId);
        else this.instances.set(c.resourceId, i);
        if (!prev || prev.state !== i.state) {
          this.pushActivity({ at, kind: c.kind, type: c.type, id: c.resourceId, text: `instance ${i.definitionName || ""} ${c.resourceId.slice(0, 8)}: ${InstanceState[i.state] ?? "?"}` });
        }
        break;
      }
      case "scalingDecision": {
        const d = c.resource.value;
        this.decisions = [d, ...this.decisions.filter((x) => x.id !== d.id)].slice(0, MAX_DECISIONS);
        break;
      }
      default:
        break;
    }
  }

  private pushActivity(a: Activity): void {
    this.activity = [a, ...this.activity].slice(0, 50);
  }

  private scheduleWorkerRefresh(id: string): void {
    const t = this.workerTimers.get(id);
    if (t) clearTimeout(t);
    this.workerTimers.set(
      id,
      setTimeout(() => {
        this.workerTimers.delete(id);
        api
          .call(WorkerService.method.getWorker, { workerId: id })
          .then((r) => {
            if (r.worker && this.workers.has(id)) {
              this.workers.set(id, r.worker);
              this.notify();
            }
          })
          .catch(() => undefined);
      }, WORKER_REFRESH_DEBOUNCE_MS),
    );
  }

  /** Replaces one worker after an action answered with it. */
  putWorker(w: CmlWorker | undefined): void {
    if (!w) return;
    this.workers.set(w.id, w);
    this.notify();
  }

  /** Replaces one instance after an action answered with it. */
  putInstance(i: LabletInstance | undefined): void {
    if (!i) return;
    this.instances.set(i.id, i);
    this.notify();
  }
}

/** The store the app uses. */
export const store = new LiveStore();
