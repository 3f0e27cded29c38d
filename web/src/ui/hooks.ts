// Small hooks: the live store, async loads, the hash route, the session.

import { createContext } from "preact";
import { useCallback, useContext, useEffect, useRef, useState } from "preact/hooks";
import { ApiError } from "../api/errors";
import type { Session } from "../api/session";
import { store } from "../api/store";

/** Re-renders the component whenever the live store changes. */
export function useStore(): typeof store {
  const [, setV] = useState(0);
  useEffect(() => store.subscribe(() => setV(store.version)), []);
  return store;
}

/** State of an async load. */
export interface AsyncState<T> {
  data: T | undefined;
  error: ApiError | undefined;
  loading: boolean;
  reload: () => void;
}

function asApiError(e: unknown): ApiError {
  return e instanceof ApiError ? e : new ApiError(0, "Error", e instanceof Error ? e.message : String(e));
}

/** Runs `fn` on mount and whenever `deps` change; keeps the last data while reloading. */
export function useAsync<T>(fn: (signal: AbortSignal) => Promise<T>, deps: unknown[]): AsyncState<T> {
  const [state, setState] = useState<{ data: T | undefined; error: ApiError | undefined; loading: boolean }>({ data: undefined, error: undefined, loading: true });
  const [tick, setTick] = useState(0);
  useEffect(() => {
    const ac = new AbortController();
    setState((s) => ({ ...s, loading: true }));
    fn(ac.signal).then(
      (data) => !ac.signal.aborted && setState({ data, error: undefined, loading: false }),
      (e) => !ac.signal.aborted && setState((s) => ({ data: s.data, error: asApiError(e), loading: false })),
    );
    return () => ac.abort();
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [...deps, tick]);
  const reload = useCallback(() => setTick((t) => t + 1), []);
  return { ...state, reload };
}

/** Current hash route as path segments: "#/workers/abc" → ["workers", "abc"]. */
export function useRoute(): { parts: string[]; query: URLSearchParams } {
  const read = () => parseHash(window.location.hash);
  const [route, setRoute] = useState(read);
  useEffect(() => {
    const on = () => setRoute(read());
    window.addEventListener("hashchange", on);
    return () => window.removeEventListener("hashchange", on);
  }, []);
  return route;
}

/** Splits a location hash into path segments and query. */
export function parseHash(hash: string): { parts: string[]; query: URLSearchParams } {
  const h = hash.replace(/^#\/?/, "");
  const [path = "", q = ""] = h.split("?", 2);
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), query: new URLSearchParams(q) };
}

/** Goes to a hash route. */
export function navigate(path: string): void {
  window.location.hash = path.startsWith("#") ? path : `#${path}`;
}

/** The session, provided by App. */
export const SessionContext = createContext<Session | undefined>(undefined);

/** The current session. */
export function useSession(): Session | undefined {
  return useContext(SessionContext);
}

/** Re-renders every `ms` (for relative times and countdowns). */
export function useNow(ms = 15_000): number {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const h = setInterval(() => setNow(Date.now()), ms);
    return () => clearInterval(h);
  }, [ms]);
  return now;
}

/** A ref to the latest value (for callbacks). */
export function useLatest<T>(v: T): { readonly current: T } {
  const r = useRef(v);
  r.current = v;
  return r;
}
