export { LeasedQueueRunner } from './leased-runner';
export {
  ageSeconds,
  type BackoffOptions,
  type DispatcherOptions,
  type ExhaustionLimits,
  isExhausted,
  nextDelay,
  notPastAgeLimit,
  type RetryPolicy,
  type Settlement,
  type SettleOptions,
  settleRetry,
  withDefaults,
} from './policy';
