import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const run = promisify(execFile);

/**
 * The sandbox is its own room (issue 11 point 5): a gateway with real destinations never loads the sandbox server
 * or @medplum/fhir-router; one without destinations loads them when it starts its built-in centre.
 */
describe('the sandbox is loaded only when it is used', () => {
  const loaded = async (env: Record<string, string>): Promise<string[]> => {
    const base = {
      NODE_ENV: 'test',
      PORT: '0',
      HOST: '127.0.0.1',
      DATABASE_URL: 'sqlite::memory:',
      DESTINATIONS_FILE: 'test/does-not-exist.json',
      LOG_LEVEL: 'error',
    };
    const { stdout } = await run(process.execPath, ['--import', 'tsx', 'test/helpers/loaded-modules.cjs', JSON.stringify({ ...base, ...env })], {
      timeout: 60_000,
    });
    return JSON.parse(stdout.trim().split('\n').pop() as string) as string[];
  };

  test('with a real destination: only the sandbox constants, no server, no fhir-router', async () => {
    const modules = await loaded({ FHIR_BASE_URL: 'http://127.0.0.1:9/fhir' });
    expect(modules.filter((m) => m.includes('fhir-router') || m.includes('sandbox/server') || m.includes('sandbox/engine'))).toEqual([]);
  }, 60_000);

  test('without destinations: the built-in sandbox server is loaded and mounted', async () => {
    const modules = await loaded({});
    expect(modules).toEqual(expect.arrayContaining(['src/sandbox/server.ts', 'src/sandbox/engine.ts', expect.stringContaining('@medplum/fhir-router')]));
  }, 60_000);
});
