// Fails the build when the gzipped JS + CSS of dist/ exceeds the budget.
import { readdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { gzipSync } from "node:zlib";

/** Budget for everything the first page load fetches, gzipped. */
const BUDGET_BYTES = 500 * 1024;
const dir = new URL("../dist/", import.meta.url).pathname;

function walk(d) {
  return readdirSync(d).flatMap((f) => {
    const p = join(d, f);
    return statSync(p).isDirectory() ? walk(p) : [p];
  });
}

let total = 0;
for (const f of walk(dir).filter((f) => /\.(js|css|html)$/.test(f))) {
  const gz = gzipSync(readFileSync(f)).length;
  total += gz;
  console.log(`${(gz / 1024).toFixed(1).padStart(8)} KiB gz  ${f.slice(dir.length)}`);
}
console.log(`${(total / 1024).toFixed(1).padStart(8)} KiB gz  total (budget ${BUDGET_BYTES / 1024} KiB)`);
if (total > BUDGET_BYTES) {
  console.error("bundle over budget");
  process.exit(1);
}
