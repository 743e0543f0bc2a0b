// Intake formats: how referrals reach the use cases in each sender's own language (README.md beside this file).
import { hl7v2Format } from './hl7v2/format';
import { jsonFormat } from './json';
import { IntakeRegistry } from './registry';

export { jsonFormat } from './json';
export {
  ackReply,
  buildAck,
  ERROR_CODES,
  HL7V2_CONTENT_TYPES,
  hl7v2Format,
  parseV2,
  V2Refusal,
  v2Submission,
  type AckError,
  type V2Parse,
  type V2Submission,
} from './hl7v2/format';
export { readV2Referral, defaultV2Tables, type V2Reading, type V2Tables } from './hl7v2/map';
export { decodeHl7Text, escapeText } from './hl7v2/escape';
export { EXTERNAL_ID_SYSTEM, FHIR_CONTENT_TYPES, fhirBundleFormat, type MirroredReferral, taskMirror, taskSearchset } from './fhir-bundle/format';
export { readReferralBundle, type BundleReading } from './fhir-bundle/map';
export { createMllpServer, MllpError, sendMllp, type MllpConnection, type MllpServerOptions } from './hl7v2/mllp';
export { IntakeRegistry, mediaType } from './registry';
export type { Acceptance, IntakeFormat, IntakeReply, Pause, ReadResult, Refusal, Submission } from './types';

/** The formats a gateway takes by default: one line per format. */
export function defaultIntakeFormats(): IntakeRegistry {
  return new IntakeRegistry([jsonFormat, hl7v2Format]);
}
