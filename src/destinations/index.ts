// Destination kinds behind adapters (README.md beside this file).
export type { DeliveryContext, DeliveryEvent, DestinationAdapter, Outcome, ReferralSummary, ReportContent } from './adapter';
export { FhirClients, fhirDestination } from './fhir';
export { DestinationAdapters } from './registry';
