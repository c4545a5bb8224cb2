// Bundles the review app's viewer (src/viewer.js) and the DICOM image loader's decoding worker with esbuild,
// and copies the codecs' WebAssembly next to them, into cds_service/review/static/viewer/. The app serves
// those files itself: no CDN. Run `npm ci && npm run build` here after changing src/ or the versions.
import { copyFileSync, mkdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "cds_service", "review", "static", "viewer");
// The packages' "exports" hide these files, so they are named by their place in node_modules.
const modules = join(here, "node_modules", "@cornerstonejs");

// Node built-ins some dependencies name: the codecs' Emscripten glue (fs, path) on a branch browsers never
// take, and vtk.js's XML writer (events, url), which the viewer never calls. Browser stand-ins, not bundles.
const BROWSER_STAND_INS = {
  fs: "module.exports = {};",
  path: "module.exports = {};",
  url: "module.exports = { URL: globalThis.URL, URLSearchParams: globalThis.URLSearchParams };",
  events: "class EventEmitter {}\nmodule.exports = EventEmitter;\nmodule.exports.EventEmitter = EventEmitter;",
};
const nodeOnly = {
  name: "node-only",
  setup(builder) {
    builder.onResolve({ filter: /^(fs|path|url|events)$/ }, (args) => ({ path: args.path, namespace: "node-only" }));
    builder.onLoad({ filter: /.*/, namespace: "node-only" }, (args) => ({ contents: BROWSER_STAND_INS[args.path] }));
  },
};

rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
await build({
  entryPoints: {
    viewer: join(here, "src", "viewer.js"),
    // init() starts it as new URL("./decodeImageFrameWorker.js", import.meta.url): the same folder.
    decodeImageFrameWorker: join(modules, "dicom-image-loader", "dist", "esm", "decodeImageFrameWorker.js"),
  },
  bundle: true,
  format: "esm",
  minify: true,
  target: "es2020",
  outdir: out,
  logLevel: "warning",
  legalComments: "linked",
  plugins: [nodeOnly],
});
// The decoders load their WebAssembly from wasmBasePath (set by viewer.js to this folder).
for (const [pkg, file] of [
  ["codec-libjpeg-turbo-8bit", "libjpegturbowasm_decode.wasm"],
  ["codec-openjpeg", "openjpegwasm_decode.wasm"],
  ["codec-charls", "charlswasm_decode.wasm"],
]) {
  copyFileSync(join(modules, pkg, "dist", file), join(out, file));
}
