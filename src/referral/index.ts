// The public surface of src/referral: what other folders use. Import from here, not from its files.
export { checkReferral, destinationDirectory, type CheckIssue } from './check';
export { ReferralService, addDocumentsSchema, cancelSchema, type NewSubmission, type Prepared, type SubmitResult } from './service';
export { listDeliveries, listHl7Returns, listWebhooks, requeueDelivery, requeueHl7Return, requeueWebhook } from './operator';
export { referralStatusSchema, referralViewSchema } from './view';
export { DocumentIntake, type DocumentLimits, type Upload } from './uploads';
