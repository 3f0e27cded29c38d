// Benchmark: the first load of the UI in headless Chromium, from navigation start until the
// dashboard has rendered with data, with a fresh browser profile (empty cache) each run.
//
//   CCM_UI_URL=http://127.0.0.1:8080 node scripts/first-load.mjs [runs]
//
// Prints one JSON line: per-run figures and the median (milliseconds). Not a test: the figures
// go into docs/benchmarks.md.
import { chromium } from "@playwright/test";

const url = process.env.CCM_UI_URL;
if (!url) {
  console.error("set CCM_UI_URL to a running ccm gateway (e.g. `ccm dev`)");
  process.exit(2);
}
const runs = Number(process.argv[2] ?? 5);
const args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];
const results = [];
for (let i = 0; i < runs; i++) {
  const browser = await chromium.launch({ executablePath: process.env.CCM_CHROMIUM ?? "/usr/bin/chromium", args });
  const page = await (await browser.newContext()).newPage();
  const started = Date.now();
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.getByTestId("page-dashboard").waitFor({ state: "visible", timeout: 30_000 });
  const rendered = Date.now() - started;
  const nav = await page.evaluate(() => {
    const e = performance.getEntriesByType("navigation")[0];
    return { domContentLoaded: Math.round(e.domContentLoadedEventEnd), load: Math.round(e.loadEventEnd) };
  });
  results.push({ rendered_ms: rendered, dom_content_loaded_ms: nav.domContentLoaded, load_ms: nav.load });
  await browser.close();
}
const sorted = results.map((r) => r.rendered_ms).sort((a, b) => a - b);
console.log(JSON.stringify({ url, runs: results, median_rendered_ms: sorted[Math.floor(sorted.length / 2)], max_rendered_ms: sorted[sorted.length - 1] }));
