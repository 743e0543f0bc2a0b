export { freeNow, JSON_PLAIN_ASCII, jsonBytes, jsonSkeleton, StreamedString } from './bytes';
export { canonicalHash } from './canonical';
export {
  LARGE_BODY_CHARS,
  LONG_STRING_CHARS,
  type LongString,
  NotUtf8Error,
  parseBytes,
  parseSharing,
  parseStored,
  parseStoredBytes,
  type PathSegment,
  type ScanProblem,
  scanJson,
  scanJsonBytes,
} from './scan';
