import { resolve } from 'node:path';
import { ConfigError, loadConfig } from './config';
import { Gateway } from './gateway';
import { SANDBOX_ID, SANDBOX_PATH } from './sandbox';
import { allocatorTuned, GLIBC_TUNABLES_RECOMMENDED } from './memory';
import { logger, setLogLevel } from './observability';

async function main(): Promise<void> {
  let config;
  try {
    config = loadConfig();
  } catch (err) {
    if (err instanceof ConfigError) {
      for (const problem of err.problems) process.stderr.write(`referral-gateway: configuration error: ${problem}\n`);
      process.exit(1);
    }
    throw err;
  }
  setLogLevel(config.logLevel);
  const gateway = new Gateway(config);
  await gateway.start();
  // Signal handlers before the banner: a supervisor that stops us on seeing it must find them.
  let stopping = false;
  const shutdown = (signal: string): void => {
    if (stopping) return;
    stopping = true;
    logger.info('shutting down', { signal });
    gateway
      .stop()
      .then(() => {
        logger.info('stopped cleanly');
        process.exit(0);
      })
      .catch((err: Error) => {
        logger.error('shutdown failed', { error: err.message });
        process.exit(1);
      });
  };
  process.on('SIGTERM', () => shutdown('SIGTERM'));
  process.on('SIGINT', () => shutdown('SIGINT'));
  process.on('unhandledRejection', (reason) => {
    logger.error('unhandled rejection', { error: (reason as Error)?.message ?? String(reason) });
  });
  logger.info('referral-gateway listening', {
    url: gateway.url,
    host: config.host,
    destinations: gateway.destinations.ids(),
    database: config.databaseUrl.split(':')[0],
  });
  if (process.platform === 'linux' && !allocatorTuned()) {
    logger.warn(
      `GLIBC_TUNABLES=${GLIBC_TUNABLES_RECOMMENDED} is not set: memory freed after large documents may stay with the process (docs/operations.md, memory)`
    );
  }

  const say = (s: string): void => void process.stdout.write(`${s}\n`);
  const bound = gateway.server?.address();
  const where = bound && typeof bound === 'object' ? `${bound.family === 'IPv6' ? `[${bound.address}]` : bound.address}:${bound.port}` : config.host;
  const everywhere = bound && typeof bound === 'object' && (bound.address === '0.0.0.0' || bound.address === '::');
  say(`referral-gateway listening on ${gateway.url} (bound to ${where}${everywhere ? ': all interfaces, reachable from other machines' : ''})`);
  if (gateway.mllp) {
    const clients = config.hl7.senders.size > 0 ? `facilities ${[...config.hl7.senders.keys()].join(', ')}` : `client "${config.hl7.listenerClient ?? '?'}"`;
    say(`HL7 v2 over MLLP on ${config.host}:${gateway.mllp.port} (REF^I12/I13/I14, OMG^O19; ${clients}); over HTTP: POST ${gateway.url}/hl7/v2`);
  }
  if (config.devKeys) {
    say('');
    say('!!! WARNING: API_KEYS is not set: using the single development client "dev" with key "dev-key". Never run like this with real patient data.');
  }
  if (config.useSandbox) {
    const fixture = resolve('fixtures/referrals/breast-second-opinion.json');
    say('');
    say(`No destination configured: the built-in sandbox FHIR R4 server is the destination "${SANDBOX_ID}" (no authentication, development only):`);
    if (config.sandbox.profile !== 'default') {
      say(
        `  (SANDBOX_PROFILE=${config.sandbox.profile}${config.sandbox.traits ? `, SANDBOX_TRAITS=${config.sandbox.traits}` : ''}: it behaves as that server does)`
      );
    }
    say(`  ${gateway.url}${SANDBOX_PATH}`);
    say('Submit the sample referral:');
    say(
      `  curl -s -X POST ${gateway.url}/referrals -H 'Authorization: Bearer ${config.devKeys ? 'dev-key' : '<your api key>'}' -H 'Content-Type: application/json' --data-binary @${fixture}`
    );
    say(`Then look at it on the sandbox: curl -s '${gateway.url}${SANDBOX_PATH}/Task?_sort=-_lastUpdated'`);
    say('To watch status webhooks, run `npm run webhooks:listen` and submit with "callbackUrl": "http://127.0.0.1:9000/hooks" (README, walk-through).');
    say('');
  }
}

main().catch((err: Error) => {
  process.stderr.write(`referral-gateway: failed to start: ${err.message}\n`);
  process.exit(1);
});
