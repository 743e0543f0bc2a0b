// The public surface of src/api: what other folders use. Import from here, not from its files.
export { adminRouter, type AdminDoctorDeps } from './admin-router';
export { intakeBudget } from './intake-budget';
export { bodyPrecheck, jsonBody } from './json-body';
export { adminAuth, apiKeyAuth, correlationMiddleware, errorHandler, notFoundHandler, requireJson } from './middleware';
export { openApiText } from './openapi';
export { openapiRouter } from './openapi-router';
export { referralsRouter, type ReportReader } from './referrals-router';
export { createLimitedServer } from './server-limits';
export { webhooksAdminRouter } from './webhooks-admin-router';
