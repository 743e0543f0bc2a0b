// Intake formats: how referrals reach the use cases in each sender's own language (README.md beside this file).
import { jsonFormat } from './json';
import { IntakeRegistry } from './registry';

export { jsonFormat } from './json';
export { IntakeRegistry } from './registry';
export type { Acceptance, IntakeFormat, IntakeReply, Pause, ReadResult, Refusal, Submission } from './types';

/** The formats a gateway takes by default: one line per format. */
export function defaultIntakeFormats(): IntakeRegistry {
  return new IntakeRegistry([jsonFormat]);
}
