/* Split virtqueue processing (virtio 1.2 section 2.7), device side. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "vd.h"

/* Ring layout offsets (virtio 1.2 2.7.6 / 2.7.8). */
#define AVAIL_FLAGS 0
#define AVAIL_IDX 2
#define AVAIL_RING 4
#define USED_FLAGS 0
#define USED_IDX 2
#define USED_RING 4

static inline uint16_t rd16(const uint8_t *p)
{
    uint16_t v;
    __atomic_load(( uint16_t *)p, &v, __ATOMIC_RELAXED);
    return v;
}

static inline void wr16(uint8_t *p, uint16_t v)
{
    __atomic_store((uint16_t *)p, &v, __ATOMIC_RELAXED);
}

static inline uint16_t avail_idx(const struct vd_queue *q) { return rd16(q->avail + AVAIL_IDX); }
static inline uint16_t avail_flags(const struct vd_queue *q) { return rd16(q->avail + AVAIL_FLAGS); }
static inline uint16_t used_event(const struct vd_queue *q) { return rd16(q->avail + AVAIL_RING + 2 * q->num); }
static inline void set_avail_event(struct vd_queue *q, uint16_t v) { wr16(q->used + USED_RING + 8 * q->num, v); }

void vd_queue_fail(struct vd_queue *q, const char *fmt, ...)
{
    va_list ap;
    if (q->broken)
        return;
    q->broken = 1;
    va_start(ap, fmt);
    vsnprintf(q->errmsg, sizeof(q->errmsg), fmt, ap);
    va_end(ap);
    q->error_pending = 1;
    q->dev->needs_reset = 1;
    uint64_t one = 1;
    /* Tell the front-end (vring err fd) and our control plane (event fd). */
    if (q->err_fd >= 0 && write(q->err_fd, &one, sizeof(one)) < 0) {
    }
    if (q->dev->event_fd >= 0 && write(q->dev->event_fd, &one, sizeof(one)) < 0) {
    }
}

/* Translate the ring addresses (front-end user addresses) to host pointers. */
int vd_queue_translate(struct vd_queue *q, char *err, size_t errlen)
{
    uint32_t n = q->num;
    if (!q->addr_set || !n) {
        snprintf(err, errlen, "queue %d started before its size and addresses were set", q->index);
        return -EINVAL;
    }
    if (q->desc_uva % 16 || q->avail_uva % 2 || q->used_uva % 4) {
        snprintf(err, errlen, "queue %d ring addresses are misaligned (desc %#llx avail %#llx used %#llx)",
                 q->index, (unsigned long long)q->desc_uva, (unsigned long long)q->avail_uva,
                 (unsigned long long)q->used_uva);
        return -EINVAL;
    }
    q->desc = vd_mem_uva(&q->dev->mem, q->desc_uva, 16ull * n);
    q->avail = vd_mem_uva(&q->dev->mem, q->avail_uva, 6ull + 2ull * n);
    q->used = vd_mem_uva(&q->dev->mem, q->used_uva, 6ull + 8ull * n);
    if (!q->desc || !q->avail || !q->used) {
        snprintf(err, errlen,
                 "queue %d rings (desc %#llx avail %#llx used %#llx, size %u) are not inside guest memory%s",
                 q->index, (unsigned long long)q->desc_uva, (unsigned long long)q->avail_uva,
                 (unsigned long long)q->used_uva, n,
                 q->dev->mem.n ? "" : " (no memory table: is guest memory shared? use share=on)");
        q->desc = q->avail = q->used = NULL;
        return -EFAULT;
    }
    return 0;
}

static inline void read_desc(const uint8_t *table, uint32_t i, struct vring_desc *d)
{
    memcpy(d, table + 16ull * i, sizeof(*d));
}

/* Walk the chain starting at `head` into q->iov.  Returns 0, or -1 after
 * marking the queue broken (a structural error the driver cannot recover
 * from without a reset). */
static int map_chain(struct vd_queue *q, uint16_t head, struct vd_req *req, struct iovec *iov, int maxiov)
{
    const struct vd_mem *mem = &q->dev->mem;
    const uint8_t *table = q->desc;
    uint32_t table_len = q->num;
    uint32_t i = head, count = 0;
    int in_indirect = 0, seen_write = 0, niov = 0;
    struct vring_desc d;

    req->head = head;
    req->nout = req->nin = 0;
    req->out_bytes = req->in_bytes = 0;
    req->iov = iov;
    if (head >= q->num) {
        vd_queue_fail(q, "queue %d: avail ring names descriptor %u, ring size is %u", q->index, head, q->num);
        return -1;
    }
    for (;;) {
        read_desc(table, i, &d);
        if (d.flags & VRING_DESC_F_INDIRECT) {
            /* Not counted: it ends the direct chain (no NEXT) and cannot nest,
             * so a table of chain_limit entries is the longest chain. */
            if (!q->indirect) {
                vd_queue_fail(q, "queue %d: indirect descriptor but INDIRECT_DESC was not negotiated", q->index);
                return -1;
            }
            if (in_indirect) {
                vd_queue_fail(q, "queue %d: nested indirect descriptor table at head %u", q->index, head);
                return -1;
            }
            if (d.flags & VRING_DESC_F_NEXT) {
                vd_queue_fail(q, "queue %d: indirect descriptor with NEXT set at head %u", q->index, head);
                return -1;
            }
            if (d.len == 0 || d.len % 16 || d.len / 16 > q->chain_limit) {
                vd_queue_fail(q, "queue %d: indirect table of %u bytes at head %u is empty, ragged or too long",
                              q->index, d.len, head);
                return -1;
            }
            table = vd_mem_gpa(mem, d.addr, d.len);
            if (!table) {
                vd_queue_fail(q, "queue %d: indirect table %#llx+%u at head %u is outside guest memory",
                              q->index, (unsigned long long)d.addr, d.len, head);
                return -1;
            }
            table_len = d.len / 16;
            in_indirect = 1;
            i = 0;
            continue;
        }
        if (++count > q->chain_limit) {
            vd_queue_fail(q, "queue %d: descriptor chain at head %u is longer than %u (loop?)",
                          q->index, head, q->chain_limit);
            return -1;
        }
        if (d.flags & VRING_DESC_F_WRITE) {
            seen_write = 1;
        } else if (seen_write) {
            vd_queue_fail(q, "queue %d: readable descriptor after a writable one at head %u", q->index, head);
            return -1;
        }
        if (d.len) {
            int n = vd_mem_map(mem, d.addr, d.len, iov + niov, maxiov - niov);
            if (n == -2) {
                vd_queue_fail(q, "queue %d: descriptor chain at head %u spans more than %d pieces of guest memory",
                              q->index, head, VD_MAX_IOV);
                return -1;
            }
            if (n < 0) {
                vd_queue_fail(q, "queue %d: buffer %#llx+%u at head %u is outside guest memory",
                              q->index, (unsigned long long)d.addr, d.len, head);
                return -1;
            }
            niov += n;
            if (d.flags & VRING_DESC_F_WRITE) {
                req->nin += n;
                req->in_bytes += d.len;
            } else {
                req->nout += n;
                req->out_bytes += d.len;
            }
        }
        if (!(d.flags & VRING_DESC_F_NEXT))
            return 0;
        if (d.next >= table_len) {
            vd_queue_fail(q, "queue %d: descriptor next %u is beyond its table of %u at head %u",
                          q->index, d.next, table_len, head);
            return -1;
        }
        i = d.next;
    }
}

static inline int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

/* Make the used entries visible (a driver that polls sees them at once). */
static inline void expose_used(struct vd_queue *q)
{
    __atomic_thread_fence(__ATOMIC_RELEASE); /* ring entries before idx */
    wr16(q->used + USED_IDX, q->used_idx);
}

/* End of a batch that began at used index `old`: make its entries visible
 * and signal the driver once if it wants it for any of them. */
static void publish_used(struct vd_queue *q, uint16_t old)
{
    uint16_t now = q->used_idx;
    if (old == now)
        return;
    expose_used(q);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* idx before reading the driver's suppression state */
    int notify;
    if (q->event_idx) {
        uint16_t prev = q->signalled_valid ? q->signalled_used : old;
        notify = need_event(used_event(q), now, prev);
        q->signalled_used = now;
        q->signalled_valid = 1;
    } else {
        notify = !(avail_flags(q) & VRING_AVAIL_F_NO_INTERRUPT);
    }
    if (notify && q->call_fd >= 0) {
        uint64_t one = 1;
        if (write(q->call_fd, &one, sizeof(one)) == sizeof(one))
            q->st.notifies++;
    }
}

static void notify_enable(struct vd_queue *q, int on)
{
    if (q->event_idx) {
        if (on)
            set_avail_event(q, q->last_avail);
    } else {
        uint16_t f = rd16(q->used + USED_FLAGS);
        wr16(q->used + USED_FLAGS, on ? (f & ~VRING_USED_F_NO_NOTIFY) : (f | VRING_USED_F_NO_NOTIFY));
    }
}

static void put_used(struct vd_queue *q, uint16_t head, uint32_t len)
{
    uint8_t *elem = q->used + USED_RING + 8 * (q->used_idx % q->num);
    uint32_t id = head;
    memcpy(elem, &id, 4);
    memcpy(elem + 4, &len, 4);
    q->used_idx++;
}

static void read_fresh_used(struct vd_queue *q)
{
    if (q->fresh) {
        /* The used ring is the truth about completed requests (also after a
         * reconnect); read it here, under the worker's SIGBUS guard. */
        q->used_idx = rd16(q->used + USED_IDX);
        q->fresh = 0;
    }
}

/* ---- device-driven use of a queue (net rx): the device takes buffers when
 * it has data.  Caller holds q->lock and has checked vd_queue_ready(). */

int vd_queue_ready(struct vd_queue *q)
{
    return q->started && q->enabled && !q->broken;
}

int vd_queue_pop(struct vd_queue *q, struct vd_req *req, struct iovec *iov, int maxiov)
{
    read_fresh_used(q);
    uint16_t avail = avail_idx(q);
    uint16_t pending = (uint16_t)(avail - q->last_avail);
    if (pending > q->num) {
        vd_queue_fail(q, "queue %d: avail index jumped from %u to %u, more than the ring size %u",
                      q->index, q->last_avail, avail, q->num);
        return -1;
    }
    if (!pending)
        return 0;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    uint16_t head = rd16(q->avail + AVAIL_RING + 2 * (q->last_avail % q->num));
    if (map_chain(q, head, req, iov, maxiov) < 0)
        return -1;
    q->last_avail++;
    return 1;
}

int vd_queue_has_avail(struct vd_queue *q)
{
    read_fresh_used(q);
    /* requests left to redo after a restart count as available work */
    return avail_idx(q) != q->last_avail || q->resubmit_pos < q->nresubmit;
}

void vd_queue_unpop(struct vd_queue *q, int n)
{
    q->last_avail -= n;
}

void vd_queue_push(struct vd_queue *q, uint16_t head, uint32_t len)
{
    put_used(q, head, len);
    q->st.requests++;
    q->st.in_bytes += len;
}

void vd_queue_flush(struct vd_queue *q)
{
    publish_used(q, rd16(q->used + USED_IDX));
}

/* Ask for a kick when the driver adds buffers; returns 1 if some arrived
 * meanwhile (then keep going instead of waiting). */
int vd_queue_want_kick(struct vd_queue *q)
{
    notify_enable(q, 1);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return avail_idx(q) != q->last_avail;
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void record_latency(struct vd_queue *q, uint64_t ns)
{
    uint64_t us = ns / 1000;
    unsigned k = us ? 64 - __builtin_clzll(us) : 0; /* smallest k with us < 2^k */
    q->st.lat[k < VD_LAT_BUCKETS ? k : VD_LAT_BUCKETS - 1]++;
    q->st.lat_sum_ns += ns;
}

/* ---- inflight tracking (vhost-user "Inflight I/O tracking", split rings).
 * Region layout: u64 features, u16 version, u16 desc_num, u16 last_batch_head,
 * u16 used_idx, then desc_num entries of {u8 inflight, u8 pad[5], u16 next,
 * u64 counter}.  The region lives in a memfd the front-end keeps across our
 * restarts; what is read back from it is checked like everything else. */
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

static void inflight_begin(struct vd_queue *q, uint16_t head)
{
    uint64_t c = ++q->inflight_counter;
    memcpy(if_desc(q, head) + 8, &c, 8);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    if_desc(q, head)[0] = 1;
}

/* After put_used: make this completion visible on its own, then forget it.
 * A crash between the two is repaired by recovery through last_batch_head. */
static void inflight_end(struct vd_queue *q, uint16_t head)
{
    wr16(q->inflight + IF_LAST_BATCH_HEAD, head);
    expose_used(q);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if_desc(q, head)[0] = 0;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    wr16(q->inflight + IF_USED_IDX, q->used_idx);
}

/* Queue start with a region: set it up if fresh, else find what a crashed
 * back-end left unfinished and line it up to be redone, oldest first. */
static int inflight_recover(struct vd_queue *q)
{
    uint16_t version = rd16(q->inflight + IF_VERSION), num = rd16(q->inflight + IF_DESC_NUM);
    q->nresubmit = q->resubmit_pos = 0;
    if (version == 0 && num == 0) {
        wr16(q->inflight + IF_DESC_NUM, (uint16_t)q->num);
        wr16(q->inflight + IF_USED_IDX, q->used_idx);
        wr16(q->inflight + IF_VERSION, 1);
        return 0;
    }
    if (version != 1 || num != q->num) {
        vd_queue_fail(q, "queue %d: inflight region has version %u for %u descriptors; the ring has %u",
                      q->index, version, num, q->num);
        return -1;
    }
    if (rd16(q->inflight + IF_USED_IDX) != q->used_idx) {
        /* Died after making a completion visible, before forgetting it. */
        uint16_t last = rd16(q->inflight + IF_LAST_BATCH_HEAD);
        if (last >= q->num) {
            vd_queue_fail(q, "queue %d: inflight last_batch_head %u is beyond the ring size %u", q->index, last,
                          q->num);
            return -1;
        }
        if_desc(q, last)[0] = 0;
        wr16(q->inflight + IF_USED_IDX, q->used_idx);
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
    return 0;
}

/* Take, handle and complete one chain.  -1: the queue broke. */
static int serve_one(struct vd_queue *q, uint16_t head, struct vd_req *req, int fresh_take)
{
    if (map_chain(q, head, req, q->iov, VD_MAX_IOV) < 0)
        return -1;
    if (q->inflight && fresh_take)
        inflight_begin(q, head);
    uint64_t t0 = q->dev->timing ? now_ns() : 0;
    uint32_t len = q->dev->handle(q->dev->ctx, req, q->index);
    put_used(q, head, len);
    if (q->inflight)
        inflight_end(q, head);
    if (t0)
        record_latency(q, now_ns() - t0);
    q->st.requests++;
    q->st.out_bytes += req->out_bytes;
    q->st.in_bytes += len;
    return 0;
}

int vd_queue_process(struct vd_queue *q, int quiet)
{
    struct vd_req req;
    unsigned since_publish = 0, budget = VD_BUDGET;
    int ret = VD_IDLE;

    read_fresh_used(q);
    uint16_t batch_start = q->used_idx;
    if (q->inflight_recover) {
        q->inflight_recover = 0;
        if (inflight_recover(q) < 0)
            goto out;
    }
    /* Requests a crashed predecessor took and never completed come first. */
    while (q->resubmit_pos < q->nresubmit) {
        if (!budget) {
            ret = VD_MORE; /* more to redo: come back, as for a full ring */
            goto out;
        }
        if (serve_one(q, q->resubmit[q->resubmit_pos++], &req, 0) < 0)
            goto out;
        budget--;
    }
    for (;;) {
        notify_enable(q, 0);
        for (;;) {
            uint16_t avail = avail_idx(q);
            uint16_t pending = (uint16_t)(avail - q->last_avail);
            if (pending > q->num) {
                vd_queue_fail(q, "queue %d: avail index jumped from %u to %u, more than the ring size %u",
                              q->index, q->last_avail, avail, q->num);
                goto out;
            }
            if (!pending)
                break;
            if (!budget) {
                /* A driver that keeps the ring full must not starve the other
                 * queues of this worker: yield, and be called again. */
                ret = VD_MORE;
                goto out;
            }
            __atomic_thread_fence(__ATOMIC_ACQUIRE); /* idx before ring entries */
            for (; pending && budget; pending--, budget--) {
                uint16_t head = rd16(q->avail + AVAIL_RING + 2 * (q->last_avail % q->num));
                if (serve_one(q, head, &req, 1) < 0)
                    goto out;
                q->last_avail++;
                if (++since_publish >= VD_USED_BATCH) {
                    /* Completions visible early (the driver may refill the
                     * ring while we work), one signal at the end. */
                    expose_used(q);
                    since_publish = 0;
                }
            }
        }
        if (quiet) {
            ret = VD_QUIET; /* the caller keeps looking at the ring (poll_us) */
            break;
        }
        notify_enable(q, 1);
        __atomic_thread_fence(__ATOMIC_SEQ_CST); /* re-enable before the final check */
        if (avail_idx(q) == q->last_avail)
            break;
    }
out:
    publish_used(q, batch_start);
    return ret;
}
