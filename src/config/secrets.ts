import { createPrivateKey, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { errorCode } from '../http';
import type { SmartBackendAuth } from './destinations';

/** A secret named by its environment variable (destinations never hold secrets themselves). */
export function requireEnv(env: NodeJS.ProcessEnv, name: string): string {
  const value = env[name];
  if (value === undefined || value === '') {
    throw new Error(`Destination auth: environment variable ${name} is not set`);
  }
  return value;
}

/**
 * The private key of a smart-backend destination, from its PEM file or the environment variable holding the
 * PEM (PKCS#8, PKCS#1 RSA or SEC1 EC). Checked against `alg` at once: RS384 needs an RSA key of 2048 bits or
 * more, ES384 a P-384 key. Errors name the file or variable, never key material.
 */
export function loadPrivateKey(auth: SmartBackendAuth, env: NodeJS.ProcessEnv = process.env): KeyObject {
  let pem: string;
  let source: string;
  if (auth.privateKeyFile !== undefined) {
    source = `file ${auth.privateKeyFile}`;
    try {
      pem = readFileSync(auth.privateKeyFile, 'utf8');
    } catch (err) {
      throw new Error(`Destination auth: cannot read the private key ${source} (${errorCode(err)})`, { cause: err });
    }
  } else if (auth.privateKeyEnv !== undefined) {
    source = `environment variable ${auth.privateKeyEnv}`;
    // A PEM in a single-line variable often has literal "\n" sequences.
    pem = requireEnv(env, auth.privateKeyEnv).replace(/\\n/g, '\n');
  } else {
    throw new Error('Destination auth: smart-backend needs privateKeyFile or privateKeyEnv');
  }
  let key: KeyObject;
  try {
    key = createPrivateKey({ key: pem, format: 'pem' });
  } catch {
    throw new Error(`Destination auth: the ${source} does not hold a PEM private key`);
  }
  if (auth.alg === 'RS384') {
    const bits = key.asymmetricKeyDetails?.modulusLength ?? 0;
    if (key.asymmetricKeyType !== 'rsa' || bits < 2048) {
      throw new Error(`Destination auth: alg RS384 needs an RSA private key of at least 2048 bits in the ${source}`);
    }
  } else if (key.asymmetricKeyType !== 'ec' || key.asymmetricKeyDetails?.namedCurve !== 'secp384r1') {
    throw new Error(`Destination auth: alg ES384 needs an EC P-384 private key in the ${source}`);
  }
  return key;
}
