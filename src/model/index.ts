// The referral as the gateway knows it: the submission's schema (zod) and the stored referral's types. A leaf:
// mapping, delivery, tracking, the store and the use cases (src/referral) all read it, and it reads none of them.
export * from './documents';
export * from './schema';
export * from './types';
export * from './tasks';
export * from './origin';
