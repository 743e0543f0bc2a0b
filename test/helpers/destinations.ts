import { writeFileSync } from 'node:fs';
import { join } from 'node:path';

/**
 * Writes a destinations registry (DESTINATIONS_FILE) into `dir` and returns its path. Each entry gets the
 * id `centre`, a name and an organization identifier unless it sets its own.
 */
export function writeDestinationsFile(dir: string, ...destinations: Array<Record<string, unknown> & { baseUrl: string }>): string {
  const file = join(dir, 'destinations.json');
  const entries = destinations.map((d) => ({
    id: 'centre',
    name: 'Centre',
    organization: { system: 'https://referral-gateway.dev/fhir/sid/destination', value: String(d.id ?? 'centre') },
    ...d,
  }));
  writeFileSync(file, JSON.stringify({ destinations: entries }));
  return file;
}
