// The shell: header with navigation, live-feed badge and user menu; the
// routed page; toasts.

import type { ComponentChildren } from "preact";
import { useEffect, useState } from "preact/hooks";
import { fetchSession, LOGOUT_PATH, primaryRole, type Session } from "../api/session";
import { store } from "../api/store";
import type { FeedStatus } from "../api/sse";
import { loginUrl } from "../api/client";
import { DashboardPage } from "../pages/Dashboard";
import { WorkersPage } from "../pages/Workers";
import { WorkerDetailPage } from "../pages/WorkerDetail";
import { InstancesPage } from "../pages/Instances";
import { InstanceDetailPage } from "../pages/InstanceDetail";
import { TimelinePage } from "../pages/Timeline";
import { DefinitionsPage } from "../pages/Definitions";
import { TemplatesPage } from "../pages/Templates";
import { ScalingPage } from "../pages/Scaling";
import { SystemPage } from "../pages/System";
import { Badge, Spinner, Toasts, type Tone } from "./kit";
import { SessionContext, useRoute, useStore } from "./hooks";

/** Roles the UI knows; a session with none of them sees "insufficient permissions". */
export const KNOWN_ROLES = ["admin", "manager", "user", "viewer"];

const NAV: [string, string][] = [
  ["dashboard", "Dashboard"],
  ["workers", "Workers"],
  ["instances", "Instances"],
  ["timeline", "Time line"],
  ["definitions", "Definitions"],
  ["templates", "Templates"],
  ["scaling", "Scaling & audit"],
  ["system", "System"],
];

const FEED_TONE: Record<FeedStatus, Tone> = { connecting: "info", live: "ok", reconnecting: "warn", offline: "bad", unauthorized: "bad" };
const FEED_LABEL: Record<FeedStatus, string> = { connecting: "Connecting", live: "Live", reconnecting: "Reconnecting", offline: "Offline", unauthorized: "Signed out" };

function FeedBadge() {
  const s = useStore();
  return (
    <button class="feed-badge" data-testid="feed-status" data-status={s.feedStatus} title={s.feedDetail || "Live updates over SSE; click to reconnect"} onClick={() => s.reconnect()}>
      <Badge tone={FEED_TONE[s.feedStatus]}>
        <span class={`dot dot-${s.feedStatus}`} aria-hidden="true" /> {FEED_LABEL[s.feedStatus]}
      </Badge>
    </button>
  );
}

function ThemeToggle() {
  const [dark, setDark] = useState(() => document.documentElement.dataset.theme === "dark");
  return (
    <button
      class="btn-icon"
      aria-label="Toggle dark mode"
      title="Toggle dark mode"
      onClick={() => {
        const next = !dark;
        setDark(next);
        document.documentElement.dataset.theme = next ? "dark" : "light";
        try {
          localStorage.setItem("ccm-theme", next ? "dark" : "light");
        } catch {
          /* storage may be disabled */
        }
      }}
    >
      {dark ? "☀" : "☾"}
    </button>
  );
}

function Shell({ session, children, active }: { session: Session; children: ComponentChildren; active: string }) {
  const [open, setOpen] = useState(false);
  return (
    <div class="shell">
      <header class="topbar">
        <button class="btn-icon nav-toggle" aria-label="Menu" onClick={() => setOpen(!open)}>
          ☰
        </button>
        <a class="brand" href="#/dashboard">
          ccm <span class="muted">lablets</span>
        </a>
        <nav class={`nav${open ? " nav-open" : ""}`} onClick={() => setOpen(false)}>
          {NAV.map(([k, label]) => (
            <a key={k} href={`#/${k}`} class={active === k ? "active" : ""} aria-current={active === k ? "page" : undefined}>
              {label}
            </a>
          ))}
          <a href="/api/docs" target="_blank" rel="noopener">
            API
          </a>
        </nav>
        <div class="topbar-right">
          <FeedBadge />
          <ThemeToggle />
          <span class="user" data-testid="user" title={session.roles.join(", ")}>
            {session.user} <Badge tone="accent">{primaryRole(session)}</Badge>
          </span>
          {session.authenticated && (
            <a class="btn btn-ghost btn-small" href={LOGOUT_PATH}>
              Log out
            </a>
          )}
        </div>
      </header>
      <main class="main">{children}</main>
      <Toasts />
    </div>
  );
}

/** The page for a route. */
function routeBody({ parts, query }: { parts: string[]; query: URLSearchParams }): { body: ComponentChildren; page: string } {
  const [page = "dashboard", id] = parts;
  let body: ComponentChildren;
  switch (page) {
    case "workers":
      body = id ? <WorkerDetailPage id={id} /> : <WorkersPage />;
      break;
    case "instances":
      body = id ? <InstanceDetailPage id={id} /> : <InstancesPage create={query.get("create") === "1"} definitionId={query.get("definition") ?? ""} />;
      break;
    case "timeline":
      body = <TimelinePage />;
      break;
    case "definitions":
      body = <DefinitionsPage selected={id ?? ""} />;
      break;
    case "templates":
      body = <TemplatesPage />;
      break;
    case "scaling":
      body = <ScalingPage />;
      break;
    case "system":
      body = <SystemPage />;
      break;
    default:
      body = <DashboardPage />;
  }
  return { body, page };
}

export function App() {
  const [session, setSession] = useState<Session | undefined>();
  const [error, setError] = useState<string | undefined>();
  const route = useRoute();
  useEffect(() => {
    fetchSession()
      .then((s) => {
        if (!s.authenticated && s.roles.length === 0) {
          window.location.assign(loginUrl(window.location.pathname + window.location.hash));
          return;
        }
        setSession(s);
        store.start();
      })
      .catch((e: unknown) => setError(e instanceof Error ? e.message : String(e)));
  }, []);
  if (error) {
    return (
      <div class="center-screen">
        <div class="error-box" role="alert">
          <strong>Cannot reach the ccm gateway.</strong> {error}
          <button class="btn btn-small" onClick={() => window.location.reload()}>
            Retry
          </button>
        </div>
      </div>
    );
  }
  if (!session) return <div class="center-screen"><Spinner label="Signing in…" /></div>;
  if (!session.roles.some((r) => KNOWN_ROLES.includes(r))) {
    return (
      <div class="center-screen">
        <div class="error-box" role="alert" data-testid="no-role">
          <strong>Insufficient permissions.</strong> You are signed in as {session.user}, but hold none of the roles {KNOWN_ROLES.join(", ")}. Ask an administrator for access.
          <a class="btn btn-small" href={LOGOUT_PATH}>
            Log out
          </a>
        </div>
      </div>
    );
  }
  const r = routeBody(route);
  return (
    <SessionContext.Provider value={session}>
      <Shell session={session} active={r.page}>
        {r.body}
      </Shell>
    </SessionContext.Provider>
  );
}
