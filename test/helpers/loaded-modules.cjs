// Starts a Gateway with the configuration given as the last argument (JSON env) and prints, as one JSON line, which
// sandbox and fhir-router modules it loaded (test/integration/sandbox-loading.test.ts).
const { loadConfig } = require('../../src/config/config');
const { Gateway } = require('../../src/gateway');
(async () => {
  const env = JSON.parse(process.argv[process.argv.length - 1]);
  const gw = new Gateway(loadConfig(env), { startPoller: false });
  await gw.start();
  const loaded = Object.keys(require.cache).filter((p) => p.includes('/src/sandbox/') || p.includes('@medplum/fhir-router'));
  process.stdout.write(JSON.stringify(loaded.map((p) => p.replace(/^.*\/(src|node_modules)\//, '$1/'))) + '\n');
  await gw.stop();
  process.exit(0);
})();
