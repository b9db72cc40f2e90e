// Copies the client and the license into this package before `npm pack` / `npm publish`
// (npm runs this as the "prepack" script; `make js` runs it too, for the tests).
//
// Why copies made here, and not kept in git or linked: the gateway serves gateway/static/gateway.js
// and gateway.mjs at /client/, and the Python wheel and the Docker image (COPY gateway) must hold
// them as real files inside the gateway package. npm leaves symbolic links out of the tarball,
// and a link in gateway/static/ pointing here would dangle in the Docker image and in any copy of
// gateway/ alone. So gateway/static/ keeps the one source, git holds no second copy (this
// directory's .gitignore lists these files), and tests/test_js_package.py checks that the packed
// files are byte for byte the ones the gateway serves from.
import { copyFileSync } from "node:fs";

const repo = new URL("../../", import.meta.url);
const here = new URL("./", import.meta.url);
for (const [from, to] of [
  ["gateway/static/gateway.js", "gateway.js"],
  ["gateway/static/gateway.mjs", "gateway.mjs"],
  ["gateway/static/gateway-rooms.js", "gateway-rooms.js"],
  ["gateway/static/gateway-rooms.mjs", "gateway-rooms.mjs"],
  ["LICENSE", "LICENSE"],
]) {
  copyFileSync(new URL(from, repo), new URL(to, here));
}
