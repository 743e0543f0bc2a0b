// Document bytes of any size outside the referral rows (issue 13): a blob store on the file system or PostgreSQL.
export { createFsBlobStore } from './fs';
export { createPostgresBlobStore } from './postgres';
export { base64Chunks, base64Length, type BlobAddress, BlobUnreadable, readBlob, verifiedBlob } from './read';
export { BlobRefused, type BlobRefusal, type BlobStore, openingBlobStore, type PutOptions, type StoredBlob } from './types';
export { putDocument } from './document';
