/* What lib/virtq.c needs from its surroundings, in its two builds:
 *
 * - the guest programs (default): the freestanding runtime of rt.h;
 * - a hosted library (VIRTQ_LIBC defined), e.g. vhostd's load generator
 *   (vhostd/native/build.py), on the C library and compiler atomics.
 *
 * Provides u8..u64, memset, snprintf/vsnprintf, READ_ONCE/WRITE_ONCE, the
 * three ring barriers, vq_report(msg) for the message of a queue that broke
 * and PRINTF_LIKE_VQ. */
#ifndef GUEST_VIRTQ_PORT_H
#define GUEST_VIRTQ_PORT_H

#ifdef VIRTQ_LIBC
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define READ_ONCE(x) (*(const volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))
/* stores before stores, loads before loads, and a full fence for a store
 * followed by a load of another location */
#define vq_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#define vq_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define vq_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
/* the caller reads q->error */
#define vq_report(msg) ((void)(msg))
#define PRINTF_LIKE_VQ(f, a) __attribute__((format(__printf__, f, a)))

#else /* guest */
#include "rt.h"

#define vq_wmb() wmb()
#define vq_rmb() rmb()
#define vq_mb() mb()
#define vq_report(msg) printf("%s\n", (msg))
#define PRINTF_LIKE_VQ(f, a) PRINTF_LIKE(f, a)
#endif

#endif
