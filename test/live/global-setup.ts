import { ConfigError, loadConfig } from '../../src/config/config';
import { describeSettings, liveSettings, SKIP_LINE } from './env';

/**
 * jest globalSetup of the live lane: without LIVE_FHIR_BASE_URL there is nothing to run against, so it
 * prints one line and ends the run with exit code 0 (the lane is opt-in, and not part of `npm test`).
 * A configuration the gateway would refuse (a missing secret, a bad option) ends it with one line and 1.
 */
export default function globalSetup(): void {
  const settings = liveSettings();
  if (!settings) {
    process.stdout.write(`${SKIP_LINE}\n`);
    process.exit(0);
  }
  try {
    loadConfig({ ...settings.fhirEnv, DESTINATIONS_FILE: '/nonexistent/destinations.json', NODE_ENV: 'test' });
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    process.stderr.write(`test:live: ${liveNames(err.message)}\n`);
    process.exit(1);
  }
  process.stdout.write(`${describeSettings(settings)}\n`);
}

/** The gateway names its own FHIR_* variables; the lane's user set LIVE_FHIR_* ones. */
export function liveNames(message: string): string {
  return message.replace(/\bFHIR_([A-Z_]+)/g, 'LIVE_FHIR_$1');
}
