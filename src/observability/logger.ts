import winston from 'winston';
import { requestContext } from './context';

/**
 * Keys whose values may carry patient data. Whatever a caller passes, these never reach a log line.
 * The primary rule is an allow-list by habit (log ids, statuses, durations); this is the safety net.
 */
const PHI_KEYS = new Set([
  'name',
  'given',
  'family',
  'birthdate',
  'birth_date',
  'dob',
  'identifier',
  'identifiers',
  'mrn',
  'phone',
  'email',
  'telecom',
  'address',
  'patient',
  'payload',
  'body',
  'data',
  'resource',
  'bundle',
]);

function scrub(value: unknown, depth = 0): unknown {
  if (depth > 6 || value === null || typeof value !== 'object') {
    return value;
  }
  if (Array.isArray(value)) {
    return value.map((v) => scrub(v, depth + 1));
  }
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
    out[k] = PHI_KEYS.has(k.toLowerCase()) ? '[redacted]' : scrub(v, depth + 1);
  }
  return out;
}

const redact = winston.format((info) => {
  for (const key of Object.keys(info)) {
    if (PHI_KEYS.has(key.toLowerCase())) {
      info[key] = '[redacted]';
    } else if (key !== 'message' && key !== 'level') {
      info[key] = scrub(info[key]);
    }
  }
  return info;
});

const correlation = winston.format((info) => {
  const ctx = requestContext.getStore();
  if (ctx && info.correlationId === undefined) {
    info.correlationId = ctx.correlationId;
  }
  return info;
});

const enabled = winston.format((info) => (logger.isLevelEnabled(info.level) ? info : false));

export const logger: winston.Logger = winston.createLogger({
  level: process.env.LOG_LEVEL ?? 'info',
  // Drop lines below the level first, so they cost no scrubbing or formatting.
  format: winston.format.combine(enabled(), correlation(), redact(), winston.format.timestamp(), winston.format.json()),
  defaultMeta: { service: 'referral-gateway' },
  transports: [new winston.transports.Console({ stderrLevels: [] })],
});

export function setLogLevel(level: string): void {
  logger.level = level;
}
