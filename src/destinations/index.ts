// Destination kinds behind adapters (README.md beside this file).
export type {
  CentreObservation,
  DeliveryContext,
  DeliveryEvent,
  DestinationAdapter,
  Outcome,
  ReadReportOptions,
  ReferralSummary,
  ReportContent,
  TrackingContext,
  TrackingMode,
} from './adapter';
export { createAuthProvider, createFhirClient, type FhirClient, FhirClients, fhirDestination, FhirRequestError } from './fhir';
export { DestinationAdapters } from './registry';
