/* Split virtqueue (virtio 1.2 section 2.7), device side: the ring itself.
 * Translating the ring addresses, walking a descriptor chain into iovecs,
 * reading the avail ring, writing the used ring and deciding when the driver
 * wants a notification.  Requests and their lifecycle are request.c's. */
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

static inline uint16_t avail_idx(const struct vd_queue *q) { return vd_rd16(q->avail + AVAIL_IDX); }
static inline uint16_t avail_flags(const struct vd_queue *q) { return vd_rd16(q->avail + AVAIL_FLAGS); }
static inline uint16_t used_event(const struct vd_queue *q) { return vd_rd16(q->avail + AVAIL_RING + 2 * q->num); }
static inline void set_avail_event(struct vd_queue *q, uint16_t v) { vd_wr16(q->used + USED_RING + 8 * q->num, v); }

/* Every write into the used ring is logged while a migration runs. */
static inline void log_used(struct vd_queue *q, uint64_t off, uint64_t len)
{
    if (__builtin_expect(q->dev->log_on, 0))
        vd_log_used(q, off, len);
}

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
    q->desc = vd_mem_uva(q->dev->mem, q->desc_uva, 16ull * n);
    q->avail = vd_mem_uva(q->dev->mem, q->avail_uva, 6ull + 2ull * n);
    q->used = vd_mem_uva(q->dev->mem, q->used_uva, 6ull + 8ull * n);
    if (!q->desc || !q->avail || !q->used) {
        snprintf(err, errlen,
                 "queue %d rings (desc %#llx avail %#llx used %#llx, size %u) are not inside guest memory%s",
                 q->index, (unsigned long long)q->desc_uva, (unsigned long long)q->avail_uva,
                 (unsigned long long)q->used_uva, n,
                 (q->dev->mem && q->dev->mem->n) ? "" : " (no memory table: is guest memory shared? use share=on)");
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
int vd_ring_map_chain(struct vd_queue *q, uint16_t head, struct vd_req *req, struct iovec *iov, int maxiov)
{
    const struct vd_mem *mem = q->dev->mem;
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
void vd_ring_expose_used(struct vd_queue *q)
{
    __atomic_thread_fence(__ATOMIC_RELEASE); /* ring entries before idx */
    vd_wr16(q->used + USED_IDX, q->used_idx);
    log_used(q, USED_IDX, 2);
}

/* End of a batch that began at used index `old`: make its entries visible
 * and signal the driver once if it wants it for any of them. */
void vd_ring_publish_used(struct vd_queue *q, uint16_t old)
{
    uint16_t now = q->used_idx;
    if (old == now)
        return;
    vd_ring_expose_used(q);
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
    if (__builtin_expect(q->dev->log_on, 0))
        vd_log_kick(q);
}

void vd_ring_notify_enable(struct vd_queue *q, int on)
{
    if (q->event_idx) {
        if (on) {
            set_avail_event(q, q->last_avail);
            log_used(q, USED_RING + 8ull * q->num, 2);
        }
    } else {
        uint16_t f = vd_rd16(q->used + USED_FLAGS);
        uint16_t want = on ? (f & ~VRING_USED_F_NO_NOTIFY) : (f | VRING_USED_F_NO_NOTIFY);
        if (want != f) {
            vd_wr16(q->used + USED_FLAGS, want);
            log_used(q, USED_FLAGS, 2);
        }
    }
}

void vd_ring_put_used(struct vd_queue *q, uint16_t head, uint32_t len)
{
    uint64_t off = USED_RING + 8ull * (q->used_idx % q->num);
    uint8_t *elem = q->used + off;
    uint32_t id = head;
    memcpy(elem, &id, 4);
    memcpy(elem + 4, &len, 4);
    log_used(q, off, 8);
    q->used_idx++;
}

void vd_ring_read_fresh_used(struct vd_queue *q)
{
    if (q->fresh) {
        /* The used ring is the truth about completed requests (also after a
         * reconnect); read it here, under the worker's SIGBUS guard. */
        q->used_idx = vd_rd16(q->used + USED_IDX);
        q->fresh = 0;
    }
}

/* Avail entries the driver added that were not taken yet (0..num), or -1
 * after marking the queue broken (the index jumped by more than the ring).
 * A positive answer is ordered before the reads of the entries. */
int vd_ring_pending(struct vd_queue *q)
{
    uint16_t avail = avail_idx(q);
    uint16_t pending = (uint16_t)(avail - q->last_avail);
    if (pending > q->num) {
        vd_queue_fail(q, "queue %d: avail index jumped from %u to %u, more than the ring size %u",
                      q->index, q->last_avail, avail, q->num);
        return -1;
    }
    if (pending)
        __atomic_thread_fence(__ATOMIC_ACQUIRE); /* idx before ring entries */
    return pending;
}

/* Start loading what the chain at avail position pos (one the driver has
 * published) will need: its descriptor, or (`buffer`) the first line of its
 * first buffer, whose descriptor was prefetched a step earlier.  The next
 * requests' lines then arrive while this one is served, instead of one
 * cache miss after another.  A prefetch never faults: bad values cost
 * nothing here and are caught when the chain is really walked. */
void vd_ring_prefetch(const struct vd_queue *q, uint16_t pos, int buffer)
{
    uint16_t head = vd_rd16(q->avail + AVAIL_RING + 2 * (pos % q->num));
    if (head >= q->num)
        return;
    const uint8_t *d = q->desc + 16ull * head;
    if (!buffer) {
        __builtin_prefetch(d);
        return;
    }
    struct vring_desc desc;
    read_desc(q->desc, head, &desc);
    if (desc.flags & VRING_DESC_F_INDIRECT)
        return;
    const uint8_t *h = vd_mem_gpa(q->dev->mem, desc.addr, 1);
    if (h && (desc.flags & VRING_DESC_F_WRITE))
        __builtin_prefetch(h, 1);
    else if (h)
        __builtin_prefetch(h, 0);
}

/* The head the driver put at avail position last_avail. */
uint16_t vd_ring_next_head(const struct vd_queue *q)
{
    return vd_rd16(q->avail + AVAIL_RING + 2 * (q->last_avail % q->num));
}

/* ---- device-driven use of a queue (net rx): the device takes buffers when
 * it has data.  Caller holds q->lock and has checked vd_queue_ready(). */

int vd_queue_ready(struct vd_queue *q)
{
    return q->started && q->enabled && !q->broken;
}

/* Buffers the driver has made available, read from its index only when the
 * ones seen last time are used up: the index shares a cache line the driver
 * writes all the time, and one read per frame costs a transfer per frame. */
static int known_pending(struct vd_queue *q)
{
    if (q->avail_known)
        return q->avail_known;
    int pending = vd_ring_pending(q);
    if (pending > 0)
        q->avail_known = (uint16_t)pending;
    return pending;
}

int vd_queue_pop(struct vd_queue *q, struct vd_req *req, struct iovec *iov, int maxiov)
{
    vd_ring_read_fresh_used(q);
    int pending = known_pending(q);
    if (pending <= 0)
        return pending;
    if (vd_ring_map_chain(q, vd_ring_next_head(q), req, iov, maxiov) < 0)
        return -1;
    q->last_avail++;
    q->avail_known--;
    if (q->avail_known > 1)
        vd_ring_prefetch(q, (uint16_t)(q->last_avail + 1), 0);
    if (q->avail_known)
        vd_ring_prefetch(q, q->last_avail, 1);
    return 1;
}

int vd_queue_has_avail(struct vd_queue *q)
{
    vd_ring_read_fresh_used(q);
    /* requests left to redo after a restart count as available work */
    return q->avail_known || avail_idx(q) != q->last_avail || q->resubmit_pos < q->nresubmit;
}

void vd_queue_unpop(struct vd_queue *q, int n)
{
    q->last_avail -= n;
    q->avail_known += n;
}

void vd_queue_push(struct vd_queue *q, uint16_t head, uint32_t len)
{
    vd_ring_put_used(q, head, len);
    q->st.requests++;
    q->st.in_bytes += len;
}

void vd_queue_flush(struct vd_queue *q)
{
    vd_ring_publish_used(q, vd_rd16(q->used + USED_IDX));
}

uint16_t vd_ring_driver_avail(const struct vd_queue *q) { return avail_idx(q); }

/* Ask for a kick when the driver adds buffers; returns 1 if some arrived
 * meanwhile (then keep going instead of waiting). */
int vd_queue_want_kick(struct vd_queue *q)
{
    vd_ring_notify_enable(q, 1);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return avail_idx(q) != q->last_avail;
}

