// The public surface of src/referral: what other folders use. Import from here, not from its files.
export { checkReferral, destinationDirectory, type CheckIssue } from './check';
export { ReferralService, addDocumentsSchema, cancelSchema, zodIssues, type SubmitResult } from './service';
export { referralStatusSchema, referralViewSchema } from './view';
