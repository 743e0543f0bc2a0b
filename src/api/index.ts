// The public surface of src/api: what other folders use. Import from here, not from its files.
export { adminRouter, type AdminDoctorDeps } from './admin-router';
export { intakeBudget } from './intake-budget';
export { bodyPrecheck, jsonBody, textBody } from './json-body';
export { answerV2Message } from './hl7v2-handler';
export { hl7v2Router } from './hl7v2-router';
export { fhirRouter } from './fhir-router';
export { startMllpListener, type MllpListener } from './mllp-listener';
export { adminAuth, apiKeyAuth, correlationMiddleware, errorHandler, notFoundHandler, requireJson, requireJsonOr } from './middleware';
export { openApiText } from './openapi';
export { openapiRouter } from './openapi-router';
export { referralsRouter, type ReportReader } from './referrals-router';
export { createLimitedServer } from './server-limits';
export { webhooksAdminRouter } from './webhooks-admin-router';
export { hl7ReturnAdminRouter } from './hl7-return-admin-router';
export { streamedIntakeRouter, declaredSha256, isStreamedRequest } from './streamed-intake';
