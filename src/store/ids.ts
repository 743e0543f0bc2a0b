import { randomBytes } from 'node:crypto';

const ALPHABET = '0123456789ABCDEFGHJKMNPQRSTVWXYZ';

/** A time-ordered unique id (ULID layout: 48-bit ms time + 80 random bits, Crockford base32). */
export function ulid(now = Date.now()): string {
  let time = '';
  let t = now;
  for (let i = 0; i < 10; i++) {
    time = ALPHABET[t % 32] + time;
    t = Math.floor(t / 32);
  }
  const bytes = randomBytes(16);
  let rand = '';
  for (let i = 0; i < 16; i++) {
    rand += ALPHABET[bytes[i] % 32];
  }
  return time + rand;
}

export const newReferralId = (): string => `ref_${ulid()}`;
export const newId = (prefix: string): string => `${prefix}_${ulid()}`;
export const nowIso = (): string => new Date().toISOString();
