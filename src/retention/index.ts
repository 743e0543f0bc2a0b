// The public surface of src/retention: what other folders use. Import from here, not from its files.
export { RetentionJob, type RetentionRun } from './job';
