import { spawn } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DatabaseSync } from 'node:sqlite';
import { fixture } from '../helpers/gateway';

/** The service as users run it: `npm start` is `tsx src/index.ts`. */
function run(env: Record<string, string>): {
  done: Promise<{ code: number | null; stdout: string; stderr: string }>;
  child: ReturnType<typeof spawn>;
  ready: Promise<string>;
} {
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/index.ts'], {
    env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '', DESTINATIONS_FILE: '/nonexistent.json', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  let resolveReady: (url: string) => void = () => undefined;
  const ready = new Promise<string>((r) => (resolveReady = r));
  child.stdout?.on('data', (d: Buffer) => {
    stdout += d.toString();
    const m = /listening on (http:\/\/\S+)/.exec(stdout);
    if (m) resolveReady(m[1]);
  });
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  const done = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) =>
    child.on('close', (code) => resolve({ code, stdout, stderr }))
  );
  return { child, done, ready };
}

describe('the service process', () => {
  test('a bad configuration value stops it with one line naming the variable and exit code 1', async () => {
    const { done } = run({ PORT: 'eighty' });
    const { code, stderr } = await done;
    expect(code).toBe(1);
    expect(stderr.trim().split('\n')).toHaveLength(1);
    expect(stderr).toMatch(/PORT/);
  });

  test('production refuses to start without API keys', async () => {
    const { done } = run({ NODE_ENV: 'production', FHIR_BASE_URL: 'https://centre.example.org/fhir/R4', WEBHOOK_SECRET: 'x'.repeat(24) });
    const { code, stderr } = await done;
    expect(code).toBe(1);
    expect(stderr).toMatch(/API_KEYS/);
  });

  test('production refuses the development key with one line, before listening', async () => {
    const { done } = run({
      NODE_ENV: 'production',
      API_KEYS: 'dev:dev-key',
      FHIR_BASE_URL: 'https://centre.example.org/fhir/R4',
      WEBHOOK_SECRET: 'x'.repeat(24),
    });
    const { code, stdout, stderr } = await done;
    expect(code).toBe(1);
    expect(stderr.trim().split('\n')).toEqual([
      'referral-gateway: configuration error: API_KEYS gives client dev the development key, which production refuses',
    ]);
    expect(stdout).not.toMatch(/listening/);
  });

  test('in development it binds to loopback unless HOST says otherwise, and prints the address it bound', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'rg-proc-'));
    const { child, done, ready } = run({ PORT: '0', DATABASE_URL: `sqlite:${join(dir, 'gateway.db')}`, LOG_LEVEL: 'warn' });
    await ready;
    child.kill('SIGTERM');
    const { stdout } = await done;
    expect(stdout).toMatch(/listening on http:\/\/127\.0\.0\.1:\d+ \(bound to 127\.0\.0\.1:\d+\)/);
  });

  test('on embedded defaults it prints the sandbox URL and a curl; SIGTERM finishes the work and exits 0', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'rg-proc-'));
    const db = join(dir, 'gateway.db');
    const { child, done, ready } = run({ PORT: '0', HOST: '127.0.0.1', DATABASE_URL: `sqlite:${db}`, LOG_LEVEL: 'warn' });
    const url = await ready;
    const res = await fetch(`${url}/referrals`, {
      method: 'POST',
      headers: { Authorization: 'Bearer dev-key', 'Content-Type': 'application/json' },
      body: JSON.stringify(fixture()),
    });
    expect(res.status).toBe(202);
    child.kill('SIGTERM');
    const { code, stdout } = await done;
    expect(code).toBe(0);
    expect(stdout).toContain('/sandbox/fhir/R4');
    expect(stdout).toMatch(/curl -s -X POST http:\/\/127\.0\.0\.1:\d+\/referrals .*breast-second-opinion\.json/);
    expect(stdout).toMatch(/API_KEYS is not set/);
    // The store was closed cleanly and kept the referral.
    const sqlite = new DatabaseSync(db);
    const rows = sqlite.prepare('select status from referrals').all() as Array<{ status: string }>;
    sqlite.close();
    expect(rows).toHaveLength(1);
    expect(['queued', 'sent']).toContain(rows[0].status);
  }, 30_000);
});
