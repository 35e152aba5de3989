// Vite build of the web console into dist/ (served by the gateway at / on its web port).
// `npm run dev` serves the sources and forwards gRPC-Web calls to a running gateway's web port
// (MODELGRID_GATEWAY_WEB_URL, default http://127.0.0.1:8081, what `make up` starts).
import { defineConfig } from "vite";

const gateway = process.env.MODELGRID_GATEWAY_WEB_URL || "http://127.0.0.1:8081";

export default defineConfig({
  build: { outDir: "dist", emptyOutDir: true },
  server: {
    proxy: {
      // gRPC-Web paths are /<package.Service>/<Method>.
      "^/(modelgrid|inference|tensorflow)\\.": { target: gateway, changeOrigin: true },
    },
  },
});
