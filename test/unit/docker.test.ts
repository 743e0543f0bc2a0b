import { readFileSync } from 'node:fs';
import { parse } from 'yaml';
import { loadConfig } from '../../src/config/config';

/** No Docker engine runs here: check what can be checked of the files users run. */
describe('docker files', () => {
  const compose = parse(readFileSync('docker/compose.yml', 'utf8')) as {
    services: Record<string, { ports?: string[]; environment?: Record<string, string>; build?: { dockerfile: string } }>;
  };

  test('compose runs the gateway with PostgreSQL and a HAPI FHIR server as the centre', () => {
    expect(Object.keys(compose.services).sort()).toEqual(['gateway', 'hapi', 'postgres']);
    expect(compose.services.gateway.ports).toContain('8080:8080');
    expect(compose.services.gateway.build?.dockerfile).toBe('docker/Dockerfile');
  });

  test("the gateway's environment in compose is a configuration the service accepts", () => {
    const env = Object.fromEntries(
      Object.entries(compose.services.gateway.environment ?? {}).map(([k, v]) => [k, String(v).replace(/\$\{[A-Z_]+:-([^}]*)\}/, '$1')])
    );
    const config = loadConfig({ ...env, DESTINATIONS_FILE: '/nonexistent.json' });
    expect(config.nodeEnv).toBe('production');
    expect(config.databaseUrl).toMatch(/^postgres:\/\/.*@postgres:5432\//);
    expect(config.destinations.map((d) => d.baseUrl)).toEqual(['http://hapi:8080/fhir']);
    expect(config.useSandbox).toBe(false);
  });

  test('the image uses Node 24, copies what the service reads at run time, and checks health without curl', () => {
    const dockerfile = readFileSync('docker/Dockerfile', 'utf8');
    expect(dockerfile).toMatch(/^FROM node:24/m);
    for (const dir of ['src', 'mappings', 'docs']) expect(dockerfile).toContain(`COPY ${dir} ./${dir}`);
    expect(dockerfile).toMatch(/HEALTHCHECK .*node -e .*\/healthz/);
    expect(dockerfile).not.toMatch(/curl|wget/);
  });

  test('the unprivileged user can write the default SQLite store, kept in a volume', () => {
    const dockerfile = readFileSync('docker/Dockerfile', 'utf8');
    expect(loadConfig({ DESTINATIONS_FILE: '/nonexistent.json' }).databaseUrl).toBe('sqlite:./data/gateway.db');
    expect(dockerfile).toMatch(/^WORKDIR \/app$/m);
    expect(dockerfile).toMatch(/mkdir -p \/app\/data && chown node:node \/app\/data/);
    expect(dockerfile).toMatch(/^VOLUME \/app\/data$/m);
    // ...and the directory is made before the image switches to that user.
    expect(dockerfile.indexOf('chown node:node /app/data')).toBeLessThan(dockerfile.indexOf('USER node'));
  });
});
