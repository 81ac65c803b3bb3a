/**
 * Back-end → front-end requests on the back-end channel (the socket handed over with
 * SET_BACKEND_REQ_FD), vhost-user.rst "Back-end message types". The front-end replies.
 *
 * | #  | request                 | request payload    | reply payload | reply      | fds (req / reply)          |
 * |----|-------------------------|--------------------|---------------|------------|----------------------------|
 * | 1  | IOTLB_MSG               | IOTLB message      | (ack u64)     | need-reply | 0 / 0                      |
 * | 2  | CONFIG_CHANGE_MSG       | -                  | (ack u64)     | need-reply | 0 / 0                      |
 * | 3  | VRING_HOST_NOTIFIER_MSG | vring area         | (ack u64)     | need-reply | 0 if no-fd bit 8 else 1 / 0|
 * | 4  | VRING_CALL              | vring state        | (ack u64)     | need-reply | 0 / 0                      |
 * | 5  | VRING_ERR               | vring state        | (ack u64)     | need-reply | 0 / 0                      |
 * | 6  | SHARED_OBJECT_ADD       | VhostUserShared    | (ack u64)     | need-reply | 0 / 0                      |
 * | 7  | SHARED_OBJECT_REMOVE    | VhostUserShared    | (ack u64)     | need-reply | 0 / 0                      |
 * | 8  | SHARED_OBJECT_LOOKUP    | VhostUserShared    | u64           | always     | 0 / 1 if u64 = 0 else 0    |
 * | 9  | SHMEM_MAP               | MMAP request       | (ack u64)     | need-reply | 1 / 0                      |
 * | 10 | SHMEM_UNMAP             | MMAP request       | (ack u64)     | need-reply | 0 / 0                      |
 */
import { BackendRequest } from "./constants.js";
import { defineRequest, RequestIndex } from "./message.js";
import {
  Empty,
  IotlbCodec,
  SharedObjectCodec,
  ShmemMapCodec,
  U64,
  VringAreaCodec,
  VringStateCodec,
} from "./payloads.js";

const B = BackendRequest;
const ack = { reply: U64, replies: "need-reply" } as const;

export const BACKEND_REQUESTS = {
  IOTLB_MSG: defineRequest("IOTLB_MSG", { code: B.IOTLB_MSG, request: IotlbCodec, ...ack }),
  CONFIG_CHANGE_MSG: defineRequest("CONFIG_CHANGE_MSG", { code: B.CONFIG_CHANGE_MSG, request: Empty, ...ack }),
  VRING_HOST_NOTIFIER_MSG: defineRequest("VRING_HOST_NOTIFIER_MSG", {
    code: B.VRING_HOST_NOTIFIER_MSG,
    request: VringAreaCodec,
    ...ack,
    fds: (a) => (a.noFd ? 0 : 1),
    fdsText: "1, or 0 with the no-fd bit",
  }),
  VRING_CALL: defineRequest("VRING_CALL", { code: B.VRING_CALL, request: VringStateCodec, ...ack }),
  VRING_ERR: defineRequest("VRING_ERR", { code: B.VRING_ERR, request: VringStateCodec, ...ack }),
  SHARED_OBJECT_ADD: defineRequest("SHARED_OBJECT_ADD", {
    code: B.SHARED_OBJECT_ADD,
    request: SharedObjectCodec,
    ...ack,
  }),
  SHARED_OBJECT_REMOVE: defineRequest("SHARED_OBJECT_REMOVE", {
    code: B.SHARED_OBJECT_REMOVE,
    request: SharedObjectCodec,
    ...ack,
  }),
  SHARED_OBJECT_LOOKUP: defineRequest("SHARED_OBJECT_LOOKUP", {
    code: B.SHARED_OBJECT_LOOKUP,
    request: SharedObjectCodec,
    reply: U64,
    replies: "always",
    replyFds: (r) => (r === 0n ? 1 : 0),
    replyFdsText: "1 with u64 0, else 0",
  }),
  SHMEM_MAP: defineRequest("SHMEM_MAP", { code: B.SHMEM_MAP, request: ShmemMapCodec, ...ack, fds: 1 }),
  SHMEM_UNMAP: defineRequest("SHMEM_UNMAP", { code: B.SHMEM_UNMAP, request: ShmemMapCodec, ...ack }),
} as const;

export type BackendRequests = typeof BACKEND_REQUESTS;
export const BACKEND_INDEX = new RequestIndex(BACKEND_REQUESTS);
