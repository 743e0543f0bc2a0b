import { readFileSync } from 'node:fs';
import path from 'node:path';
import { Router } from 'express';
import { logger } from '../observability/logger';
import { Failure } from '../outcomes';

/** Where docs/openapi.json lies: from src/api (tsx) and, as a fallback, from a build under dist/src/api. */
const candidates = [path.resolve(__dirname, '../../docs/openapi.json'), path.resolve(__dirname, '../../../docs/openapi.json')];

/** Reads and checks the document once; undefined (with a logged error) when no copy is installed. */
function loadDocument(): Buffer | undefined {
  for (const file of candidates) {
    let bytes: Buffer;
    try {
      bytes = readFileSync(file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
      throw err;
    }
    // A broken document is a build defect: fail at start-up rather than serve it.
    const doc = JSON.parse(bytes.toString('utf8')) as { openapi?: unknown };
    if (typeof doc.openapi !== 'string') throw new Error(`${file} is not an OpenAPI document`);
    return bytes;
  }
  logger.error('docs/openapi.json is not installed: GET /openapi.json answers 404', { looked: candidates });
  return undefined;
}

/**
 * GET /openapi.json: the OpenAPI 3.1 document of the public interface (docs/openapi.json), with
 * no authentication. Mount it before the authenticated routers.
 */
export function openapiRouter(): Router {
  const document = loadDocument();
  const r = Router();
  r.get('/openapi.json', (_req, res) => {
    if (!document) {
      throw new Failure('not-found', { code: 'not-found', message: 'the OpenAPI document is not installed with this service (docs/openapi.json)' });
    }
    res.status(200).type('application/json').set('Cache-Control', 'no-cache').send(document);
  });
  return r;
}
