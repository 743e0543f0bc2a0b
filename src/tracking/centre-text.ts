// Text a cancer centre's server supplies (a Task's statusReason and businessStatus, a report's title and
// content type) is stored and shown to referrers. It is bounded and cleaned first: a centre, or anyone who
// can write its Tasks, should not be able to make the gateway store megabytes or serve a made-up type.

/** The longest status reason (Task.businessStatus text and Task.statusReason text, joined) kept: 1,000 characters. */
export const MAX_STATUS_REASON_CHARS = 1000;
/** The longest report title kept: 200 characters. */
export const MAX_REPORT_TITLE_CHARS = 200;

const CONTENT_TYPE = /^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}\/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$/i;

/**
 * `text` made well-formed Unicode, without control characters other than line breaks and tabs, cut to
 * `max` characters (never inside a surrogate pair) with an ellipsis when it was longer.
 */
export function centreText(text: string | undefined, max: number): string | undefined {
  if (text === undefined) return undefined;
  // eslint-disable-next-line no-control-regex
  const clean = text.toWellFormed().replace(/[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f]/g, '');
  if (clean.length <= max) return clean;
  let cut = max - 1;
  const code = clean.charCodeAt(cut - 1);
  if (code >= 0xd800 && code <= 0xdbff) cut -= 1;
  return `${clean.slice(0, cut)}…`;
}

/** A centre's content type, lower-cased without parameters, when it is a well-formed `type/subtype`; otherwise undefined. */
export function centreContentType(value: string | undefined): string | undefined {
  const bare = value?.split(';')[0].trim().toLowerCase();
  return bare && CONTENT_TYPE.test(bare) ? bare : undefined;
}
