import { Router } from 'express';
import { openApiDocument } from './openapi';

/**
 * GET /openapi.json: the OpenAPI 3.1 document of the public interface, generated from the zod schemas and the route
 * metadata (src/api/openapi) on the first request and kept, with no authentication. Mount it before the
 * authenticated routers.
 */
export function openapiRouter(): Router {
  let body: string | undefined;
  const r = Router();
  r.get('/openapi.json', (_req, res) => {
    body ??= JSON.stringify(openApiDocument());
    res.status(200).type('application/json').set('Cache-Control', 'no-cache').send(body);
  });
  return r;
}
