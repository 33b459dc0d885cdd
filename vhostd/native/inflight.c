/* Inflight I/O tracking (vhost-user "Inflight I/O tracking", split rings).
 *
 * The front-end keeps a memfd across our restarts; each queue has a region
 * of it where every request we take is marked until its completion is
 * visible in the used ring.  A restarted vhostd reads the region back and
 * redoes what is still marked, oldest first.  Completions may come in any
 * order: each one is made visible and forgotten on its own.
 *
 * Region layout: u64 features, u16 version, u16 desc_num, u16 last_batch_head,
 * u16 used_idx, then desc_num entries of {u8 inflight, u8 pad[5], u16 next,
 * u64 counter}.  What is read back from it is checked like everything else. */
#define _GNU_SOURCE
#include <string.h>

#include "vd.h"

#define IF_VERSION 8
#define IF_DESC_NUM 10
#define IF_LAST_BATCH_HEAD 12
#define IF_USED_IDX 14
#define IF_DESC 16
#define IF_ENTRY 16

uint64_t vd_inflight_queue_bytes(uint32_t queue_size)
{
    return (IF_DESC + (uint64_t)IF_ENTRY * queue_size + 63) & ~63ull;
}

static inline uint8_t *if_desc(struct vd_queue *q, uint16_t head)
{
    return q->inflight + IF_DESC + IF_ENTRY * head;
}

void vd_inflight_begin(struct vd_queue *q, uint16_t head)
{
    uint64_t c = ++q->inflight_counter;
    memcpy(if_desc(q, head) + 8, &c, 8);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    if_desc(q, head)[0] = 1;
}

/* A request taken and then given back untouched (VD_REQ_RETRY): unmark it. */
void vd_inflight_cancel(struct vd_queue *q, uint16_t head)
{
    if_desc(q, head)[0] = 0;
}

/* After put_used: make this completion visible on its own, then forget it.
 * A crash between the two is repaired by recovery through last_batch_head. */
void vd_inflight_end(struct vd_queue *q, uint16_t head)
{
    vd_wr16(q->inflight + IF_LAST_BATCH_HEAD, head);
    vd_ring_expose_used(q);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if_desc(q, head)[0] = 0;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    vd_wr16(q->inflight + IF_USED_IDX, q->used_idx);
}

/* Queue start with a region: set it up if fresh, else find what a crashed
 * back-end left unfinished and line it up to be redone, oldest first. */
int vd_inflight_recover(struct vd_queue *q)
{
    uint16_t version = vd_rd16(q->inflight + IF_VERSION), num = vd_rd16(q->inflight + IF_DESC_NUM);
    q->nresubmit = q->resubmit_pos = 0;
    if (version == 0 && num == 0) {
        vd_wr16(q->inflight + IF_DESC_NUM, (uint16_t)q->num);
        vd_wr16(q->inflight + IF_USED_IDX, q->used_idx);
        vd_wr16(q->inflight + IF_VERSION, 1);
        return 0;
    }
    if (version != 1 || num != q->num) {
        vd_queue_fail(q, "queue %d: inflight region has version %u for %u descriptors; the ring has %u",
                      q->index, version, num, q->num);
        return -1;
    }
    if (vd_rd16(q->inflight + IF_USED_IDX) != q->used_idx) {
        /* Died after making a completion visible, before forgetting it. */
        uint16_t last = vd_rd16(q->inflight + IF_LAST_BATCH_HEAD);
        if (last >= q->num) {
            vd_queue_fail(q, "queue %d: inflight last_batch_head %u is beyond the ring size %u", q->index, last,
                          q->num);
            return -1;
        }
        if_desc(q, last)[0] = 0;
        vd_wr16(q->inflight + IF_USED_IDX, q->used_idx);
    }
    uint64_t counters[VD_MAX_QUEUE_SIZE];
    uint64_t top = 0;
    int n = 0;
    for (uint32_t head = 0; head < q->num; head++) {
        if (!if_desc(q, head)[0])
            continue;
        uint64_t c;
        memcpy(&c, if_desc(q, head) + 8, 8);
        int j = n++; /* insertion by counter: n <= 1024 and this runs once per start */
        while (j > 0 && counters[j - 1] > c) {
            counters[j] = counters[j - 1];
            q->resubmit[j] = q->resubmit[j - 1];
            j--;
        }
        counters[j] = c;
        q->resubmit[j] = (uint16_t)head;
        if (c > top)
            top = c;
    }
    q->nresubmit = n;
    q->inflight_counter = top;
    /* Every request taken is completed (counted in used idx) or in flight. */
    q->last_avail = (uint16_t)(q->used_idx + n);
    q->avail_known = 0;
    return 0;
}
