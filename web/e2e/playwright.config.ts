// End-to-end tests of the UI against a running ccm (gateway URL in CCM_UI_URL),
// in the system Chromium. Never downloads browsers.
import { defineConfig } from "@playwright/test";

/** The system Chromium (apt package `chromium`; scripts/lib.sh ensure_chromium). */
export const CHROMIUM = process.env.CCM_CHROMIUM ?? "/usr/bin/chromium";

export default defineConfig({
  testDir: ".",
  testMatch: /.*\.spec\.ts/,
  fullyParallel: false,
  workers: 1,
  retries: 0,
  timeout: 120_000,
  expect: { timeout: 15_000 },
  reporter: [["list"]],
  outputDir: "../test-results",
  use: {
    baseURL: process.env.CCM_UI_URL,
    viewport: { width: 1440, height: 900 },
    trace: "off",
    launchOptions: {
      executablePath: CHROMIUM,
      args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    },
  },
});
