import { unsupported } from '../outcomes';
import type { IntakeFormat } from './types';

/** The media type of a Content-Type header, lower-cased, without parameters. */
export function mediaType(contentType: string | undefined): string {
  return (contentType ?? '').split(';')[0].trim().toLowerCase();
}

function matches(pattern: string, type: string): boolean {
  if (pattern === type) return true;
  // `application/*+json`: any subtype with that suffix.
  const m = /^([^/]+)\/\*(\+[\w.-]+)$/.exec(pattern);
  return m !== null && type.startsWith(`${m[1]}/`) && type.endsWith(m[2]);
}

/** The intake formats the gateway takes referrals in, chosen by Content-Type. */
export class IntakeRegistry {
  readonly #formats: IntakeFormat[] = [];

  constructor(formats: ReadonlyArray<IntakeFormat> = []) {
    for (const f of formats) this.register(f);
  }

  register(format: IntakeFormat): this {
    if (this.#formats.some((f) => f.name === format.name)) throw new Error(`intake format ${format.name} is registered twice`);
    this.#formats.push(format);
    return this;
  }

  /** The format for a Content-Type; a Failure (`unsupported`) naming the types taken when there is none. */
  forContentType(contentType: string | undefined): IntakeFormat {
    const type = mediaType(contentType);
    const found = this.#formats.find((f) => f.contentTypes.some((p) => matches(p, type)));
    if (!found) {
      const taken = this.#formats.flatMap((f) => f.contentTypes).join(', ');
      throw unsupported(`a referral is taken as ${taken}; Content-Type ${type || '(none)'} is not one of them`, 'Content-Type');
    }
    return found;
  }

  /** Every media type some format is chosen for. */
  get contentTypes(): string[] {
    return this.#formats.flatMap((f) => [...f.contentTypes]);
  }

  get names(): string[] {
    return this.#formats.map((f) => f.name);
  }
}
