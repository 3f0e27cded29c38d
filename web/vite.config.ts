import { defineConfig } from "vitest/config";

// The gateway serves the built UI and the API on one origin. `npm run dev`
// proxies the API paths to CCM_GATEWAY_URL (default http://127.0.0.1:8080).
const gateway = process.env.CCM_GATEWAY_URL ?? "http://127.0.0.1:8080";
const proxied = ["/v1", "/auth", "/healthz", "/readyz", "/openapi.json", "/api"];

export default defineConfig({
  esbuild: { jsx: "automatic", jsxImportSource: "preact" },
  build: {
    target: "es2022",
    sourcemap: true,
    chunkSizeWarningLimit: 600,
  },
  server: {
    proxy: Object.fromEntries(proxied.map((p) => [p, { target: gateway, changeOrigin: false }])),
  },
  preview: {
    proxy: Object.fromEntries(proxied.map((p) => [p, { target: gateway, changeOrigin: false }])),
  },
  test: {
    include: ["test/**/*.test.ts", "test/**/*.test.tsx"],
    environment: "node",
  },
});
