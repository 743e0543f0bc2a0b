import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { generateKeyPairSync } from 'node:crypto';
import { join } from 'node:path';
import { ConfigError, loadConfig } from '../../src/config/config';
import { loadDestinationsFile } from '../../src/config/destinations';

const base = { DESTINATIONS_FILE: '/nonexistent/destinations.json' };

describe('configuration', () => {
  test('embedded defaults: SQLite, sandbox, dev key, port 8080, 25 MB bodies', () => {
    const c = loadConfig({ ...base });
    expect(c.databaseUrl).toBe('sqlite:./data/gateway.db');
    expect(c.useSandbox).toBe(true);
    expect(c.devKeys).toBe(true);
    expect([...c.apiKeys.entries()]).toEqual([['dev', 'dev-key']]);
    expect(c.port).toBe(8080);
    expect(c.maxBodyBytes).toBe(25 * 1024 * 1024);
    // Closed referrals drop their document bytes after 30 days; referrals themselves are kept.
    expect(c.retention).toEqual({ documentDays: 30, referralDays: 0, cron: '17 3 * * *' });
  });

  test.each([
    [{ PORT: 'eighty' }, /^PORT /],
    [{ PORT: '70000' }, /^PORT /],
    [{ DATABASE_URL: 'mysql://x' }, /^DATABASE_URL /],
    [{ POLL_CRON: 'every minute' }, /^POLL_CRON /],
    [{ API_KEYS: 'no-colon' }, /^API_KEYS /],
    [{ MAX_BODY_BYTES: '-1' }, /^MAX_BODY_BYTES /],
    [{ LOG_LEVEL: 'loud' }, /^LOG_LEVEL /],
    [{ FHIR_BASE_URL: 'not a url' }, /^FHIR_BASE_URL /],
    [{ FHIR_AUTH: 'magic' }, /^FHIR_AUTH /],
    [{ WEBHOOK_SECRET: 'whsec_not*base64!!' }, /^WEBHOOK_SECRET /],
    [{ WEBHOOK_SECRET: 'short' }, /^WEBHOOK_SECRET /],
    [{ WEBHOOK_ALLOW_PRIVATE_NETWORKS: 'yes' }, /^WEBHOOK_ALLOW_PRIVATE_NETWORKS must be true or false/],
    [{ DELIVERY_MAX_AGE_MS: '10' }, /^DELIVERY_MAX_AGE_MS /],
    [{ DOCUMENT_RETENTION_DAYS: '-1' }, /^DOCUMENT_RETENTION_DAYS /],
    [{ REFERRAL_RETENTION_DAYS: 'forever' }, /^REFERRAL_RETENTION_DAYS /],
    [{ RETENTION_CRON: 'nightly' }, /^RETENTION_CRON /],
    [{ DOCUMENT_RETENTION_DAYS: '90', REFERRAL_RETENTION_DAYS: '30' }, /^DOCUMENT_RETENTION_DAYS \(90\) is longer than REFERRAL_RETENTION_DAYS \(30\)/],
  ])('a bad value (%j) is one line naming the variable', (env, pattern) => {
    let err: unknown;
    try {
      loadConfig({ ...base, ...env });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ConfigError);
    expect((err as Error).message).toMatch(pattern);
    expect((err as Error).message).not.toContain('\n');
  });

  /** The ConfigError loadConfig throws for `env`. */
  const refused = (env: NodeJS.ProcessEnv): ConfigError => {
    try {
      loadConfig(env);
    } catch (e) {
      if (e instanceof ConfigError) return e;
      throw e;
    }
    throw new Error('loadConfig accepted the configuration');
  };

  test('every problem is reported at once: two bad values are two lines of one error, each naming its variable', () => {
    const err = refused({ ...base, PORT: 'abc', LOG_LEVEL: 'loud' });
    expect(err.problems).toHaveLength(2);
    expect(err.problems[0]).toMatch(/^PORT .*\(got "abc"\)$/);
    expect(err.problems[1]).toMatch(/^LOG_LEVEL .*\(got "loud"\)$/);
    expect(err.message.split('\n')).toEqual(err.problems);
  });

  test('bad values and broken rules between the other values are reported together, in the order of the checks', () => {
    const retention = { DOCUMENT_RETENTION_DAYS: '90', REFERRAL_RETENTION_DAYS: '30' };
    const err = refused({ ...base, ...retention, NODE_ENV: 'production', PORT: 'abc', API_KEYS: 'a:short', INTAKE_BODY_TIMEOUT_MS: '200000' });
    expect(err.problems.map((p) => p.split(' ')[0])).toEqual([
      'PORT',
      'FHIR_BASE_URL',
      'DOCUMENT_RETENTION_DAYS',
      'API_KEYS:',
      'REQUEST_TIMEOUT_MS',
      'WEBHOOK_SECRET',
    ]);
  });

  test('a rule that needs a bad value is not checked: only the bad value is reported', () => {
    // API_KEYS unreadable: neither "required in production" nor "CLIENT_IDENTIFIER_SYSTEMS names an unknown client".
    const prod = { ...base, NODE_ENV: 'production', FHIR_BASE_URL: 'https://c.example.org/fhir/R4', WEBHOOK_SECRET: 'x'.repeat(20) };
    expect(refused({ ...prod, API_KEYS: 'no-colon', CLIENT_IDENTIFIER_SYSTEMS: 'c=http://c.org/mrn' }).problems).toEqual([
      'API_KEYS must be comma-separated clientId:key pairs',
    ]);
    // A bad FHIR_BASE_URL: not also "the sandbox is refused in production".
    expect(refused({ ...prod, API_KEYS: `a:${'k'.repeat(24)}`, FHIR_BASE_URL: 'not a url' }).problems).toHaveLength(1);
    // A bad NODE_ENV: no production rule is guessed at.
    expect(refused({ ...base, NODE_ENV: 'prod' }).problems).toEqual([expect.stringMatching(/^NODE_ENV /)]);
  });

  test('every missing secret of a destination is named, and the key of one is checked once it is set', () => {
    const fhir = { ...base, FHIR_BASE_URL: 'https://c.example.org/fhir/R4' };
    expect(refused({ ...fhir, FHIR_AUTH: 'basic' }).problems).toEqual([
      'FHIR_USERNAME is required by destination "default" (auth basic) but is not set',
      'FHIR_PASSWORD is required by destination "default" (auth basic) but is not set',
    ]);
    const smart = { ...fhir, FHIR_AUTH: 'smart-backend', FHIR_TOKEN_URL: 'https://c.example.org/token', FHIR_SCOPE: 'system/Task.rs' };
    expect(refused(smart).problems.map((p) => p.split(' ')[0])).toEqual(['FHIR_CLIENT_ID', 'FHIR_PRIVATE_KEY']);
  });

  test('ConfigError keeps its problems, and a single problem is its whole message', () => {
    expect(new ConfigError('X is bad').problems).toEqual(['X is bad']);
    expect(new ConfigError('X is bad').message).toBe('X is bad');
    expect(new ConfigError(['X is bad', 'Y is bad']).message).toBe('X is bad\nY is bad');
  });

  test('secrets are never echoed in the error', () => {
    expect(() => loadConfig({ ...base, API_KEYS: 'supersecretvalue' })).toThrow(/^API_KEYS /);
    try {
      loadConfig({ ...base, API_KEYS: 'supersecretvalue' });
    } catch (e) {
      expect((e as Error).message).not.toContain('supersecretvalue');
    }
  });

  test('production refuses to start without keys, or on the sandbox', () => {
    expect(() => loadConfig({ ...base, NODE_ENV: 'production', FHIR_BASE_URL: 'https://c.example.org/fhir/R4', WEBHOOK_SECRET: 'x'.repeat(20) })).toThrow(
      /^API_KEYS /
    );
    expect(() => loadConfig({ ...base, NODE_ENV: 'production', API_KEYS: 'a:b', WEBHOOK_SECRET: 'x'.repeat(20) })).toThrow(/^FHIR_BASE_URL /);
  });

  test('production refuses the development key, keys shorter than 24 characters and a client listed twice', () => {
    const prod = { ...base, NODE_ENV: 'production', FHIR_BASE_URL: 'https://c.example.org/fhir/R4', WEBHOOK_SECRET: 'x'.repeat(20) };
    const long = 'k'.repeat(24);
    expect(() => loadConfig({ ...prod, API_KEYS: 'dev:dev-key' })).toThrow(/^API_KEYS gives client dev the development key/);
    expect(() => loadConfig({ ...prod, API_KEYS: 'a:short' })).toThrow(/^API_KEYS: the key of client a is shorter than 24 characters/);
    expect(() => loadConfig({ ...prod, API_KEYS: `a:${long}`, ADMIN_API_KEY: 'adminkey1' })).toThrow(/^ADMIN_API_KEY is shorter than 24/);
    expect(loadConfig({ ...prod, API_KEYS: `a:${long}` }).apiKeys.get('a')).toBe(long);
    // A client id listed twice stops start-up in every environment, with one line.
    expect(() => loadConfig({ ...base, API_KEYS: `a:${long},a:${'j'.repeat(24)}` })).toThrow(/^API_KEYS lists client a twice/);
    expect(() => loadConfig({ ...base, API_KEYS: `a:${long}`, ADMIN_API_KEY: long })).toThrow(/^ADMIN_API_KEY is also a client key/);
  });

  test('HOST defaults to loopback in development and test, all interfaces in production', () => {
    expect(loadConfig({ ...base }).host).toBe('127.0.0.1');
    expect(loadConfig({ ...base, NODE_ENV: 'test' }).host).toBe('127.0.0.1');
    expect(loadConfig({ ...base, HOST: '0.0.0.0' }).host).toBe('0.0.0.0');
    const prod = {
      ...base,
      NODE_ENV: 'production',
      API_KEYS: `a:${'k'.repeat(24)}`,
      FHIR_BASE_URL: 'https://c.example.org/fhir/R4',
      WEBHOOK_SECRET: 'x'.repeat(20),
    };
    expect(loadConfig(prod).host).toBe('0.0.0.0');
  });

  test('CLIENT_IDENTIFIER_SYSTEMS gives each system to one client', () => {
    const keys = { API_KEYS: 'a:key-aaaaaaaa,b:key-bbbbbbbb' };
    const c = loadConfig({ ...base, ...keys, CLIENT_IDENTIFIER_SYSTEMS: 'a=http://a.org/mrn urn:oid:1.2.3; b=http://b.org/mrn' });
    expect([...c.clientIdentifierSystems.entries()]).toEqual([
      ['a', ['http://a.org/mrn', 'urn:oid:1.2.3']],
      ['b', ['http://b.org/mrn']],
    ]);
    expect(() => loadConfig({ ...base, ...keys, CLIENT_IDENTIFIER_SYSTEMS: 'a=http://x.org/mrn;b=http://x.org/mrn' })).toThrow(
      /^CLIENT_IDENTIFIER_SYSTEMS gives system http:\/\/x\.org\/mrn to both a and b/
    );
    expect(() => loadConfig({ ...base, ...keys, CLIENT_IDENTIFIER_SYSTEMS: 'c=http://c.org/mrn' })).toThrow(
      /^CLIENT_IDENTIFIER_SYSTEMS names client c, which API_KEYS does not have/
    );
    expect(() => loadConfig({ ...base, ...keys, CLIENT_IDENTIFIER_SYSTEMS: 'a' })).toThrow(/^CLIENT_IDENTIFIER_SYSTEMS must be/);
    expect(loadConfig({ ...base }).clientIdentifierSystems.size).toBe(0);
  });

  test('HL7_RETURN_CHANNELS gives each client one MLLP receiver (IPv6 in brackets); the clients must exist', () => {
    const keys = { API_KEYS: 'a:key-aaaaaaaa,b:key-bbbbbbbb' };
    const c = loadConfig({ ...base, ...keys, HL7_RETURN_CHANNELS: 'a=ehr.a.example:2576, b=[::1]:6661' });
    expect([...c.hl7.returnChannels.entries()]).toEqual([
      ['a', { host: 'ehr.a.example', port: 2576 }],
      ['b', { host: '::1', port: 6661 }],
    ]);
    expect(loadConfig({ ...base }).hl7.returnChannels.size).toBe(0);
    expect(() => loadConfig({ ...base, ...keys, HL7_RETURN_CHANNELS: 'c=h:1' })).toThrow(/^HL7_RETURN_CHANNELS names client c, which API_KEYS does not have/);
    for (const bad of ['a=host', 'a=host:0', 'a=host:70000', 'a:host:2575', 'a=h:1,a=h:2']) {
      expect(() => loadConfig({ ...base, ...keys, HL7_RETURN_CHANNELS: bad })).toThrow(/^HL7_RETURN_CHANNELS /);
    }
  });

  test('intake and store limits have deliberate defaults and are checked together', () => {
    const c = loadConfig({ ...base });
    expect(c.intake).toEqual({
      maxJsonDepth: 64,
      clientShare: 0.5,
      bodyTimeoutMs: 60_000,
      headersTimeoutMs: 10_000,
      requestTimeoutMs: 120_000,
      maxConnectionsPerAddress: 32,
    });
    expect(c.store).toEqual({ busyWaitMs: 5000, probeCacheMs: 2000 });
    expect(() => loadConfig({ ...base, INTAKE_BODY_TIMEOUT_MS: '200000' })).toThrow(/^REQUEST_TIMEOUT_MS \(120000\) is shorter than INTAKE_BODY_TIMEOUT_MS/);
    expect(() => loadConfig({ ...base, INTAKE_CLIENT_SHARE: '0' })).toThrow(/^INTAKE_CLIENT_SHARE /);
  });

  test('callbacks to private networks are allowed in development and refused in production unless set', () => {
    const prod = {
      ...base,
      NODE_ENV: 'production',
      API_KEYS: `a:${'k'.repeat(24)}`,
      FHIR_BASE_URL: 'https://c.example.org/fhir/R4',
      WEBHOOK_SECRET: 'x'.repeat(20),
    };
    expect(loadConfig({ ...base }).webhookAllowPrivateNetworks).toBe(true);
    expect(loadConfig(prod).webhookAllowPrivateNetworks).toBe(false);
    expect(loadConfig({ ...prod, WEBHOOK_ALLOW_PRIVATE_NETWORKS: 'true' }).webhookAllowPrivateNetworks).toBe(true);
    expect(loadConfig({ ...base, WEBHOOK_ALLOW_PRIVATE_NETWORKS: 'false' }).webhookAllowPrivateNetworks).toBe(false);
  });

  test('FHIR_BASE_URL defines the destination "default" with its auth', () => {
    const c = loadConfig({ ...base, FHIR_BASE_URL: 'https://centre.example.org/fhir/R4/', FHIR_AUTH: 'bearer', FHIR_TOKEN: 't0k' });
    expect(c.useSandbox).toBe(false);
    expect(c.destinations).toHaveLength(1);
    expect(c.destinations[0]).toMatchObject({ id: 'default', baseUrl: 'https://centre.example.org/fhir/R4', auth: { type: 'bearer', tokenEnv: 'FHIR_TOKEN' } });
  });

  test('a destination whose secret variable is unset stops start-up, naming it', () => {
    expect(() => loadConfig({ ...base, FHIR_BASE_URL: 'https://c.example.org/fhir/R4', FHIR_AUTH: 'basic', FHIR_USERNAME: 'u' })).toThrow(
      /^FHIR_PASSWORD is required/
    );
    expect(() => loadConfig({ ...base, FHIR_BASE_URL: 'https://c.example.org/fhir/R4', FHIR_AUTH: 'client-credentials' })).toThrow(/^FHIR_TOKEN_URL /);
  });

  test('FHIR_AUTH=smart-backend checks its key at start-up', () => {
    const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-384' });
    const pem = privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
    const env = {
      ...base,
      FHIR_BASE_URL: 'https://c.example.org/fhir/R4',
      FHIR_AUTH: 'smart-backend',
      FHIR_TOKEN_URL: 'https://c.example.org/token',
      FHIR_SCOPE: 'system/Task.rs',
      FHIR_CLIENT_ID: 'gw',
    };
    const c = loadConfig({ ...env, FHIR_PRIVATE_KEY: pem });
    expect(c.destinations[0].auth).toMatchObject({ type: 'smart-backend', alg: 'ES384', privateKeyEnv: 'FHIR_PRIVATE_KEY', scope: 'system/Task.rs' });
    expect(() => loadConfig({ ...env, FHIR_PRIVATE_KEY: 'not a key' })).toThrow(/^FHIR_PRIVATE_KEY /);
    expect(() => loadConfig({ ...env })).toThrow(/^FHIR_PRIVATE_KEY is required/);
    expect(() => loadConfig({ ...env, FHIR_SCOPE: '' })).toThrow(/FHIR_SCOPE/);
  });

  test('the shipped registry is empty (sandbox by default) and the example registry is valid', () => {
    expect(loadDestinationsFile('mappings/destinations.json')).toEqual([]);
    const examples = loadDestinationsFile('mappings/destinations.example.json');
    expect(examples.map((d) => d.auth.type)).toEqual(['none', 'client-credentials', 'smart-backend']);
    // The routing rules in mappings/ name these centres.
    const routing = JSON.parse(readFileSync('mappings/routing.json', 'utf8')) as { rules: Array<{ destination: string }> };
    for (const r of routing.rules) expect(examples.map((d) => d.id)).toContain(r.destination);
  });

  test('API_KEYS parses client:key pairs', () => {
    const c = loadConfig({ ...base, API_KEYS: 'city-hospital:s3cr3t, other:k2' });
    expect(c.apiKeys.get('city-hospital')).toBe('s3cr3t');
    expect(c.apiKeys.get('other')).toBe('k2');
    expect(c.devKeys).toBe(false);
  });

  test('a destinations file is checked with its own clear errors', () => {
    const dir = mkdtempSync(join(tmpdir(), 'rg-'));
    const file = join(dir, 'destinations.json');
    writeFileSync(file, JSON.stringify({ destinations: [{ id: 'Bad Id', name: 'x', organization: { system: 's', value: 'v' }, baseUrl: 'https://x/fhir' }] }));
    expect(() => loadConfig({ DESTINATIONS_FILE: file })).toThrow(/DESTINATIONS_FILE .*destinations\.0\.id/);
    writeFileSync(file, '{nope');
    expect(() => loadConfig({ DESTINATIONS_FILE: file })).toThrow(/not valid JSON/);
    writeFileSync(
      file,
      JSON.stringify({
        destinations: [
          { id: 'centre-a', name: 'Centre A', organization: { system: 's', value: 'v' }, baseUrl: 'https://a.example.org/fhir/R4', pollCron: '*/15 * * * *' },
        ],
      })
    );
    const c = loadConfig({ DESTINATIONS_FILE: file });
    expect(c.destinations[0]).toMatchObject({ id: 'centre-a', timeoutMs: 30000, maxInlineBytes: 1048576, auth: { type: 'none' } });
    expect(c.useSandbox).toBe(false);
  });
});
