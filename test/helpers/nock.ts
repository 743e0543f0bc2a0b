import nock from 'nock';

/**
 * For tests that fake a centre with nock: real connections only to loopback (the gateway under test,
 * a sandbox or receiver it runs), so a request to any other host must meet an interceptor.
 */
export function allowOnlyLoopback(): void {
  nock.disableNetConnect();
  nock.enableNetConnect(/127\.0\.0\.1/);
}

/** Undoes allowOnlyLoopback, dropping whatever interceptors are left. */
export function allowAllNetwork(): void {
  nock.cleanAll();
  nock.enableNetConnect();
}
