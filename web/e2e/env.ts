// What the e2e tests need to know about the system under test.
import { test as base, expect, type APIRequestContext, type Page } from "@playwright/test";

/** The gateway URL (required). */
export const UI_URL = process.env.CCM_UI_URL ?? "";
/**
 * Base URL of the test OIDC issuer (tools/oidc-issuer), e.g. http://127.0.0.1:8031. When set,
 * the tests mint bearer tokens for its users (admin, viewer, …) with its /debug/sign endpoint.
 */
export const OIDC_BASE = process.env.CCM_OIDC_ISSUER_BASE ?? "";
/** Ready-made bearer tokens, when no issuer is given. */
const TOKENS: Record<string, string | undefined> = { admin: process.env.CCM_UI_ADMIN_TOKEN, viewer: process.env.CCM_UI_VIEWER_TOKEN };
/** Where screenshots go (referenced from docs/ui.md). */
export const SCREENSHOTS = new URL("../screenshots/", import.meta.url).pathname;

/** A bearer token for a user of the test issuer, or undefined when auth is not set up. */
export async function tokenFor(request: APIRequestContext, user: "admin" | "viewer" | "user"): Promise<string | undefined> {
  if (TOKENS[user]) return TOKENS[user];
  if (!OIDC_BASE) return undefined;
  const r = await request.post(`${OIDC_BASE}/debug/sign`, { data: { user } });
  expect(r.ok(), `minting a token for ${user}`).toBe(true);
  return ((await r.json()) as { token: string }).token;
}

/** Does the gateway enforce authentication? (`via: "none"` means every caller is an anonymous admin.) */
export async function authEnabled(request: APIRequestContext): Promise<boolean> {
  const r = await request.get(`${UI_URL}/auth/session`);
  if (r.status() === 401) return true;
  const j = (await r.json()) as { via?: string };
  return j.via !== "none";
}

/** Headers that authenticate as `user` (empty without auth). */
export async function authHeaders(request: APIRequestContext, user: "admin" | "viewer" | "user"): Promise<Record<string, string>> {
  const t = await tokenFor(request, user);
  return t ? { Authorization: `Bearer ${t}` } : {};
}

/** Waits until the live feed badge says "live". */
export async function waitLive(page: Page): Promise<void> {
  await expect(page.getByTestId("feed-status")).toHaveAttribute("data-status", "live", { timeout: 30_000 });
}

export const test = base.extend<{ adminPage: Page }>({
  adminPage: async ({ browser, request }, use) => {
    const ctx = await browser.newContext({ extraHTTPHeaders: await authHeaders(request, "admin") });
    const page = await ctx.newPage();
    await use(page);
    await ctx.close();
  },
});

test.beforeAll(() => {
  if (!UI_URL) throw new Error("set CCM_UI_URL to the gateway of a running ccm (e.g. `ccm dev`), e.g. CCM_UI_URL=http://127.0.0.1:8080");
});

export { expect };
