import { readFileSync } from 'node:fs';
import { parse } from 'yaml';
import { loadConfig } from '../../src/config/config';
import { allocatorTuned, GLIBC_TUNABLES_RECOMMENDED } from '../../src/memory';

interface Service {
  image?: string;
  profiles?: string[];
  ports?: string[];
  environment?: Record<string, string | number>;
  command?: string | string[];
  entrypoint?: string[];
  build?: { dockerfile: string };
  depends_on?: Record<string, { condition: string }>;
}

/** No Docker engine runs here: check what can be checked of the files users run. */
describe('docker files', () => {
  const compose = parse(readFileSync('docker/compose.yml', 'utf8')) as { services: Record<string, Service> };
  const services = compose.services;
  const docs = readFileSync('docs/for-cancer-centres.md', 'utf8');
  const readme = readFileSync('README.md', 'utf8');
  const inProfile = (p: string): string[] =>
    Object.keys(services)
      .filter((s) => services[s].profiles?.includes(p))
      .sort();
  const env = (s: string): Record<string, string> => Object.fromEntries(Object.entries(services[s].environment ?? {}).map(([k, v]) => [k, String(v)]));
  /** The host port published for a container port, from "host:container". */
  const published = (s: string, container: number): number | undefined => {
    const p = (services[s].ports ?? []).map((x) => x.split(':').map(Number)).find(([, c]) => c === container);
    return p?.[0];
  };

  test('compose has a hapi profile (gateway, PostgreSQL, HAPI FHIR) and a medplum profile (Medplum with PostgreSQL and Redis)', () => {
    expect(inProfile('hapi')).toEqual(['gateway', 'hapi', 'postgres']);
    expect(inProfile('medplum')).toEqual(['medplum-app', 'medplum-postgres', 'medplum-redis', 'medplum-server']);
    // Nothing starts without a profile: every service belongs to one.
    expect(
      Object.entries(services)
        .filter(([, s]) => !s.profiles?.length)
        .map(([name]) => name)
    ).toEqual([]);
    expect(services.gateway.ports).toContain('8080:8080');
    expect(services.gateway.build?.dockerfile).toBe('docker/Dockerfile');
    expect(services.hapi.image).toMatch(/^hapiproject\/hapi:/);
    expect(services['medplum-server'].image).toMatch(/^medplum\/medplum-server:/);
    expect(services['medplum-app'].image).toMatch(/^medplum\/medplum-app:/);
  });

  test('every dependency exists and is started by the same profile', () => {
    for (const [name, s] of Object.entries(services)) {
      for (const dep of Object.keys(s.depends_on ?? {})) {
        expect(services[dep]).toBeDefined();
        // `docker compose --profile X up` refuses a service whose dependency X does not enable.
        for (const p of s.profiles ?? []) expect([name, dep, services[dep].profiles ?? []]).toEqual([name, dep, expect.arrayContaining([p])]);
      }
    }
  });

  test("the gateway's environment in compose is a configuration the service accepts", () => {
    const gatewayEnv = Object.fromEntries(Object.entries(env('gateway')).map(([k, v]) => [k, v.replace(/\$\{[A-Z_]+:-([^}]*)\}/, '$1')]));
    const config = loadConfig({ ...gatewayEnv, DESTINATIONS_FILE: '/nonexistent.json' });
    expect(config.nodeEnv).toBe('production');
    expect(config.databaseUrl).toMatch(/^postgres:\/\/.*@postgres:5432\//);
    expect(config.destinations.map((d) => d.baseUrl)).toEqual(['http://hapi:8080/fhir']);
    expect(config.destinations[0].profile).toBe('hapi');
    expect(config.useSandbox).toBe(false);
    // The gateway's PostgreSQL credentials are the ones its DATABASE_URL uses.
    const db = new URL(config.databaseUrl);
    const pg = env('postgres');
    expect([db.username, db.password, db.pathname.slice(1)]).toEqual([pg.POSTGRES_USER, pg.POSTGRES_PASSWORD, pg.POSTGRES_DB]);
  });

  test("Medplum's database, Redis and URLs in compose fit together", () => {
    const m = env('medplum-server');
    // The env variables Medplum's own docker-compose.full-stack.yml configures the server with ("env" config).
    expect(services['medplum-server'].entrypoint?.at(-1)).toBe('env');
    const pg = env(m.MEDPLUM_DATABASE_HOST);
    expect(services[m.MEDPLUM_DATABASE_HOST].image).toMatch(/^postgres:/);
    expect([m.MEDPLUM_DATABASE_USERNAME, m.MEDPLUM_DATABASE_PASSWORD, m.MEDPLUM_DATABASE_DBNAME]).toEqual([
      pg.POSTGRES_USER,
      pg.POSTGRES_PASSWORD,
      pg.POSTGRES_DB,
    ]);
    expect(m.MEDPLUM_DATABASE_PORT).toBe('5432');
    const redis = services[m.MEDPLUM_REDIS_HOST];
    expect(redis.image).toMatch(/^redis:/);
    expect(String(redis.command)).toContain(`--requirepass ${m.MEDPLUM_REDIS_PASSWORD}`);
    expect(m.MEDPLUM_REDIS_PORT).toBe('6379');
    for (const dep of [m.MEDPLUM_DATABASE_HOST, m.MEDPLUM_REDIS_HOST]) {
      expect(services['medplum-server'].depends_on?.[dep]).toEqual({ condition: 'service_healthy' });
    }

    // The URLs Medplum hands out are the ones the host reaches it on.
    const port = Number(m.MEDPLUM_PORT);
    const base = new URL(m.MEDPLUM_BASE_URL);
    expect(base.hostname).toBe('localhost');
    expect(Number(base.port)).toBe(published('medplum-server', port));
    expect(m.MEDPLUM_STORAGE_BASE_URL.startsWith(m.MEDPLUM_BASE_URL)).toBe(true);
    expect(Number(new URL(m.MEDPLUM_APP_BASE_URL).port)).toBe(published('medplum-app', 3000));
    expect(env('medplum-app').MEDPLUM_BASE_URL).toBe(m.MEDPLUM_BASE_URL);
    // The gateway's medplum profile assumes Medplum's default JSON limit.
    expect(m.MEDPLUM_MAX_JSON_SIZE).toBe('1mb');
  });

  test('the docs name the URLs, ports and profiles compose publishes', () => {
    const hapiBase = `http://localhost:${published('hapi', 8080)}/fhir`;
    const medplum = env('medplum-server').MEDPLUM_BASE_URL.replace(/\/$/, '');
    expect(docs).toContain(`LIVE_FHIR_BASE_URL=${hapiBase} LIVE_FHIR_PROFILE=hapi`);
    expect(docs).toContain(`LIVE_FHIR_BASE_URL=${medplum}/fhir/R4 LIVE_FHIR_PROFILE=medplum`);
    expect(docs).toContain(`LIVE_FHIR_TOKEN_URL=${medplum}/oauth2/token`);
    expect(docs).toContain(`${env('medplum-server').MEDPLUM_APP_BASE_URL.replace(/\/$/, '')}, sign in as admin@example.com / medplum_admin`);
    for (const profile of ['hapi', 'medplum']) expect(docs).toContain(`docker compose -f docker/compose.yml --profile ${profile} up`);
    // Every profile or service the docs and README name exists in compose.
    for (const text of [docs, readme]) {
      for (const [, p] of text.matchAll(/--profile ([a-z-]+)/g)) expect(inProfile(p).length).toBeGreaterThan(0);
      for (const [, s] of text.matchAll(/--profile [a-z-]+ up(?: -d)? ([a-z][a-z-]*)/g)) expect(Object.keys(services)).toContain(s);
    }
    expect(readme).toContain('docker/compose.yml');
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

  test('npm start and the image start the service with the allocator setting that gives large documents back (README memory figures)', () => {
    const dockerfile = readFileSync('docker/Dockerfile', 'utf8');
    expect(dockerfile).toContain(`ENV GLIBC_TUNABLES=${GLIBC_TUNABLES_RECOMMENDED}`);
    const start = (JSON.parse(readFileSync('package.json', 'utf8')) as { scripts: Record<string, string> }).scripts.start;
    expect(start).toBe(`GLIBC_TUNABLES=\${GLIBC_TUNABLES:-${GLIBC_TUNABLES_RECOMMENDED}} tsx src/index.ts`);
    expect(allocatorTuned({ GLIBC_TUNABLES: GLIBC_TUNABLES_RECOMMENDED })).toBe(true);
    expect(allocatorTuned({ GLIBC_TUNABLES: 'glibc.malloc.arena_max=2' })).toBe(false);
    expect(allocatorTuned({})).toBe(false);
  });
});
