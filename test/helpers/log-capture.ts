import Transport from 'winston-transport';

/** A winston transport that keeps every log line as its JSON text, for tests that read what was logged. */
export class LogCapture extends Transport {
  lines: string[] = [];
  override log(info: unknown, next: () => void): void {
    this.lines.push(JSON.stringify(info));
    next();
  }
}
