// The browser session (/auth/session) and role gating. Which roles may call
// an RPC is read from the `(ccm.v1.authz)` option of the generated method
// descriptor — the same table the control plane enforces — so the UI never
// keeps a role table of its own.

import { getOption, hasOption, type DescMethod } from "@bufbuild/protobuf";
import { authz, Role } from "../gen/ccm/v1/authz_pb";

/** Where the gateway answers who is logged in. */
export const SESSION_PATH = "/auth/session";
/** Where the gateway ends the session. */
export const LOGOUT_PATH = "/auth/logout";

/** Who is using the UI. */
export interface Session {
  authenticated: boolean;
  /** Display name (or subject) of the user. */
  user: string;
  /** Token subject, used to recognise the user's own instances; "" if unknown. */
  subject: string;
  /** Realm roles, lower case ("admin", "manager", "user", "viewer", …). */
  roles: string[];
  /** When the session expires, if it does. */
  expiresAt: Date | undefined;
  /** How the gateway knows the caller: "session" (cookie), "bearer", or "none" (auth disabled). */
  via: string;
}

/** The token role name of a Role enum value ("admin" for ROLE_ADMIN). */
export function roleName(r: Role): string {
  return (Role[r] ?? "").toLowerCase();
}

/** Roles allowed to call an RPC, by token name. Empty when the RPC declares none. */
export function rolesFor(method: DescMethod): string[] {
  if (!hasOption(method, authz)) return [];
  return getOption(method, authz).roles.map(roleName);
}

/** True when the RPC acts on owned resources (instances). */
export function isOwnerScoped(method: DescMethod): boolean {
  return hasOption(method, authz) && getOption(method, authz).ownerScoped;
}

/** Roles that see and act on everybody's owned resources. */
const UNSCOPED_ROLES = ["admin", "manager", "service"];

/**
 * Whether the session may call `method`, optionally on a resource owned by
 * `ownerId`. Mirrors the server: any-of the declared roles, and for
 * owner-scoped RPCs either an unscoped role or ownership.
 */
export function can(session: Session | undefined, method: DescMethod, ownerId?: string): boolean {
  if (!session) return false;
  const allowed = rolesFor(method);
  if (!session.roles.some((r) => allowed.includes(r))) return false;
  if (ownerId !== undefined && isOwnerScoped(method) && !session.roles.some((r) => UNSCOPED_ROLES.includes(r))) {
    return session.subject !== "" && ownerId === session.subject;
  }
  return true;
}

function str(v: unknown): string | undefined {
  return typeof v === "string" && v !== "" ? v : undefined;
}

/** Normalises the /auth/session JSON into a Session. */
export function parseSession(json: unknown): Session {
  const o = (json && typeof json === "object" ? json : {}) as Record<string, unknown>;
  const u = o.user ?? o.username;
  let user = "";
  let subject = str(o.subject) ?? str(o.sub) ?? "";
  if (typeof u === "string") {
    user = u;
  } else if (u && typeof u === "object") {
    const uo = u as Record<string, unknown>;
    user = str(uo.name) ?? str(uo.preferred_username) ?? str(uo.username) ?? str(uo.email) ?? str(uo.sub) ?? "";
    subject = subject || (str(uo.sub) ?? str(uo.subject) ?? str(uo.id) ?? "");
  }
  if (!subject) subject = user;
  const roles = Array.isArray(o.roles) ? o.roles.filter((r): r is string => typeof r === "string").map((r) => r.toLowerCase()) : [];
  // Unix seconds (the gateway) or an RFC 3339 string.
  const exp = o.expiresAt ?? o.expires_at;
  const expiresAt = typeof exp === "number" ? new Date(exp * 1000) : typeof exp === "string" && exp ? new Date(exp) : undefined;
  return {
    authenticated: o.authenticated === true,
    user: user || "anonymous",
    subject,
    roles,
    expiresAt: expiresAt && !Number.isNaN(expiresAt.getTime()) ? expiresAt : undefined,
    via: str(o.via) ?? "",
  };
}

/** Reads the session; throws on network errors. */
export async function fetchSession(fetchImpl: typeof fetch = (i, n) => globalThis.fetch(i, n)): Promise<Session> {
  const res = await fetchImpl(SESSION_PATH, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (res.status === 401) return { authenticated: false, user: "", subject: "", roles: [], expiresAt: undefined, via: "" };
  if (!res.ok) throw new Error(`${SESSION_PATH} answered HTTP ${res.status}`);
  return parseSession(await res.json());
}

/** The highest role, for display. */
export function primaryRole(session: Session | undefined): string {
  const order = ["admin", "manager", "user", "viewer", "service", "assessment"];
  return order.find((r) => session?.roles.includes(r)) ?? "none";
}
