import type { Hl7Field, Hl7Message } from '@medplum/core';
import type { V2Origin } from '../../model';
import { decodeHl7Text, escapeText } from './escape';
import { delimitersOf } from './map';

/**
 * One field's first repetition, its first `components` components decoded in the message's delimiters and encoded
 * again with the default ones (escaped), trailing empty components dropped: an HD (MSH-3) or EI (RF1-6) as ER7 that
 * can be written into a message of ours as it is.
 */
function reencoded(message: Hl7Message, segment: string, field: number, components: number): string {
  const delimiters = delimitersOf(message);
  let f: Hl7Field | undefined;
  try {
    f = message.getSegment(segment)?.getField(field);
  } catch {
    return '';
  }
  const first = Array.isArray(f?.components) ? f.components[0] : undefined;
  const parts = Array.from({ length: components }, (_, i) => {
    const raw = first?.[i];
    return typeof raw === 'string' ? escapeText(decodeHl7Text(raw, delimiters).trim()) : '';
  });
  while (parts.length > 0 && parts[parts.length - 1] === '') parts.pop();
  return parts.join('^');
}

/**
 * The sender of a new referral message and how to address it back: REF^I12 is the `REF` family, OMG^O19 (360X) the
 * `OMG` one. MSH-3 to MSH-6 as HDs, MSH-12, and the sender's id for the referral (RF1-6; ORC-2, else OBR-2).
 */
export function v2Origin(message: Hl7Message, messageType: string): V2Origin | undefined {
  const family = messageType.startsWith('REF^') ? 'REF' : 'OMG';
  if (!messageType.startsWith('REF^') && !messageType.startsWith('OMG^')) return undefined;
  const identifier = family === 'REF' ? reencoded(message, 'RF1', 6, 4) : reencoded(message, 'ORC', 2, 4) || reencoded(message, 'OBR', 2, 4);
  return {
    family,
    sendingApplication: reencoded(message, 'MSH', 3, 3),
    sendingFacility: reencoded(message, 'MSH', 4, 3),
    receivingApplication: reencoded(message, 'MSH', 5, 3),
    receivingFacility: reencoded(message, 'MSH', 6, 3),
    version: reencoded(message, 'MSH', 12, 1),
    referralIdentifier: identifier,
  };
}
