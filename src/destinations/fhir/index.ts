// The FHIR destination: a centre's FHIR R4 server (Medplum, HAPI, any R4 server, each with its settings). The
// referral goes as one transaction (Binary uploads first where the server needs them), documents added later and
// cancels as their own writes, and the report is read from the Task's output.
import type { Destination } from '../../config';
import type { StoredReferral } from '../../model';
import type { DeliveryContext, DestinationAdapter, ReadReportOptions, ReportContent } from '../adapter';
import { FhirClients } from './clients';
import { deliverCancel, deliverDocuments, deliverSubmit } from './operations';
import { readReportContent } from './report';
import { fhirTracker } from './track';

export { FhirClients } from './clients';
export { createAuthProvider, createFhirClient, type FhirClient, FhirRequestError } from './client';

/** The adapter for `type: fhir` destinations, over the gateway's FHIR clients (one per destination). */
export function fhirDestination(clients: FhirClients = new FhirClients()): DestinationAdapter {
  const withClient = (ctx: DeliveryContext) => ({ ...ctx, client: clients.get(ctx.destination) });
  return {
    type: 'fhir',
    submit: (ctx) => deliverSubmit(withClient(ctx)),
    addDocuments: (ctx, take) => deliverDocuments(withClient(ctx), take),
    cancel: (ctx, task) => deliverCancel(withClient(ctx), task),
    track: fhirTracker(clients),
    readReport: (referral: StoredReferral, destination: Destination, opts?: ReadReportOptions): Promise<ReportContent> =>
      readReportContent(clients.get(destination), referral, opts),
  };
}
