/* Virtqueues, device side: the rings themselves, in both layouts.
 *
 * Split (virtio 1.2 section 2.7): a descriptor table, the driver's avail
 * ring and our used ring, with free-running 16-bit indices.
 * Packed (section 2.8): one descriptor ring both sides write.  A descriptor
 * is available when its AVAIL flag equals the driver's wrap counter and its
 * USED flag does not; we hand a buffer back by writing one descriptor (its
 * id, the bytes written, AVAIL = USED = our wrap counter) at our used
 * position, which then moves on by as many descriptors as the chain took.
 * Notifications are suppressed through two small areas (driver's, device's)
 * instead of ring flags and indices.
 *
 * This file translates the ring addresses, finds and walks available chains
 * into iovecs, writes used entries and decides when the driver wants a
 * notification.  Requests and their lifecycle are request.c's. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "vd.h"

/* Split ring layout offsets (virtio 1.2 2.7.6 / 2.7.8). */
#define AVAIL_FLAGS 0
#define AVAIL_IDX 2
#define AVAIL_RING 4
#define USED_FLAGS 0
#define USED_IDX 2
#define USED_RING 4
/* Packed descriptor and event suppression area offsets (2.8.13, 2.8.10). */
#define PDESC_LEN 8
#define PDESC_ID 12
#define PDESC_FLAGS 14
#define EVENT_OFF_WRAP 0
#define EVENT_FLAGS 2

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

/* Packed rings: what we write lies in the descriptor ring or the device
 * area, logged by its guest-physical address. */
static inline void log_host(struct vd_queue *q, void *p, size_t len)
{
    if (__builtin_expect(q->dev->log_on, 0)) {
        struct iovec v = {p, len};
        vd_log_iov(q, q->dev->mem, &v, 1, len);
    }
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
    int packed = !!(q->dev->features & (1ull << VIRTIO_F_RING_PACKED));
    if (!q->addr_set || !n) {
        snprintf(err, errlen, "queue %d started before its size and addresses were set", q->index);
        return -EINVAL;
    }
    /* packed: the two event areas are 4-byte structures (2.8.10.1) */
    if (q->desc_uva % 16 || q->avail_uva % (packed ? 4 : 2) || q->used_uva % 4) {
        snprintf(err, errlen, "queue %d ring addresses are misaligned (desc %#llx avail %#llx used %#llx)",
                 q->index, (unsigned long long)q->desc_uva, (unsigned long long)q->avail_uva,
                 (unsigned long long)q->used_uva);
        return -EINVAL;
    }
    q->desc = vd_mem_uva(q->dev->mem, q->desc_uva, 16ull * n);
    q->avail = vd_mem_uva(q->dev->mem, q->avail_uva, packed ? 4 : 6ull + 2ull * n);
    q->used = vd_mem_uva(q->dev->mem, q->used_uva, packed ? 4 : 6ull + 8ull * n);
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

/* ---------------------------------------------------------------- walking a chain */

/* Where a walk is: the chain it fills and the iovecs it has used. */
struct walk {
    struct vd_chain *c;
    struct iovec *iov;
    int maxiov, niov;
    int seen_write;
    uint32_t count;         /* buffers so far, against chain_limit */
    uint16_t at;            /* for messages: the head (split) or position (packed) */
    const char *what;       /* "head" or "position" */
};

static void walk_begin(struct walk *w, int q_packed, struct vd_chain *c, struct iovec *iov, int maxiov, uint16_t at)
{
    *w = (struct walk){.c = c, .iov = iov, .maxiov = maxiov, .at = at, .what = q_packed ? "position" : "head"};
    c->nout = c->nin = 0;
    c->out_bytes = c->in_bytes = 0;
}

/* One buffer of the chain: readable ones come before writable ones. */
static int map_buffer(struct vd_queue *q, struct walk *w, uint64_t addr, uint32_t len, int writable)
{
    if (++w->count > q->chain_limit) {
        vd_queue_fail(q, "queue %d: descriptor chain at %s %u is longer than %u (loop?)", q->index, w->what, w->at,
                      q->chain_limit);
        return -1;
    }
    if (writable) {
        w->seen_write = 1;
    } else if (w->seen_write) {
        vd_queue_fail(q, "queue %d: readable descriptor after a writable one at %s %u", q->index, w->what, w->at);
        return -1;
    }
    if (!len)
        return 0;
    int n = vd_mem_map(q->dev->mem, addr, len, w->iov + w->niov, w->maxiov - w->niov);
    if (n == -2) {
        vd_queue_fail(q, "queue %d: descriptor chain at %s %u spans more than %d pieces of guest memory", q->index,
                      w->what, w->at, VD_MAX_IOV);
        return -1;
    }
    if (n < 0) {
        vd_queue_fail(q, "queue %d: buffer %#llx+%u at %s %u is outside guest memory", q->index,
                      (unsigned long long)addr, len, w->what, w->at);
        return -1;
    }
    w->niov += n;
    if (writable) {
        w->c->nin += n;
        w->c->in_bytes += len;
    } else {
        w->c->nout += n;
        w->c->out_bytes += len;
    }
    return 0;
}

/* An indirect descriptor: its table, checked; NULL after failing the queue. */
static const uint8_t *indirect_table(struct vd_queue *q, struct walk *w, uint64_t addr, uint32_t len, int nested,
                                     int next)
{
    if (!q->indirect) {
        vd_queue_fail(q, "queue %d: indirect descriptor but INDIRECT_DESC was not negotiated", q->index);
        return NULL;
    }
    if (nested) {
        vd_queue_fail(q, "queue %d: nested indirect descriptor table at %s %u", q->index, w->what, w->at);
        return NULL;
    }
    if (next) {
        vd_queue_fail(q, "queue %d: indirect descriptor with NEXT set at %s %u", q->index, w->what, w->at);
        return NULL;
    }
    /* Not counted itself: it ends the chain and cannot nest, so a table of
     * chain_limit entries is the longest chain. */
    if (len == 0 || len % 16 || len / 16 > q->chain_limit) {
        vd_queue_fail(q, "queue %d: indirect table of %u bytes at %s %u is empty, ragged or too long",
                      q->index, len, w->what, w->at);
        return NULL;
    }
    const uint8_t *t = vd_mem_gpa(q->dev->mem, addr, len);
    if (!t)
        vd_queue_fail(q, "queue %d: indirect table %#llx+%u at %s %u is outside guest memory", q->index,
                      (unsigned long long)addr, len, w->what, w->at);
    return t;
}

static inline void read_desc(const uint8_t *table, uint32_t i, struct vring_desc *d)
{
    memcpy(d, table + 16ull * i, sizeof(*d));
}

/* Split: walk the chain starting at `head` (0 or -1 after failing the queue). */
int vd_ring_map_split(struct vd_queue *q, uint16_t head, struct vd_chain *c, struct iovec *iov, int maxiov)
{
    const uint8_t *table = q->desc;
    uint32_t table_len = q->num, i = head;
    int in_indirect = 0;
    struct vring_desc d;
    struct walk w;

    walk_begin(&w, 0, c, iov, maxiov, head);
    c->id = head;
    c->ndesc = 1;
    c->pos = head;
    if (head >= q->num) {
        vd_queue_fail(q, "queue %d: avail ring names descriptor %u, ring size is %u", q->index, head, q->num);
        return -1;
    }
    for (;;) {
        read_desc(table, i, &d);
        if (d.flags & VRING_DESC_F_INDIRECT) {
            table = indirect_table(q, &w, d.addr, d.len, in_indirect, d.flags & VRING_DESC_F_NEXT);
            if (!table)
                return -1;
            table_len = d.len / 16;
            in_indirect = 1;
            i = 0;
            continue;
        }
        if (map_buffer(q, &w, d.addr, d.len, d.flags & VRING_DESC_F_WRITE) < 0)
            return -1;
        if (!(d.flags & VRING_DESC_F_NEXT))
            return 0;
        if (d.next >= table_len) {
            vd_queue_fail(q, "queue %d: descriptor next %u is beyond its table of %u at head %u", q->index, d.next,
                          table_len, head);
            return -1;
        }
        i = d.next;
    }
}

/* Packed: one descriptor of a chain (from the ring or a copy of it).
 * Returns 1 when the chain goes on, 0 at its end, -1 after failing. */
static int map_packed_desc(struct vd_queue *q, struct walk *w, const struct vring_packed_desc *d)
{
    if (d->flags & VRING_DESC_F_INDIRECT) {
        const uint8_t *t = indirect_table(q, w, d->addr, d->len, 0, d->flags & VRING_DESC_F_NEXT);
        if (!t)
            return -1;
        /* The table's entries follow each other (no NEXT links, 2.8.19). */
        for (uint32_t i = 0; i < d->len / 16; i++) {
            struct vring_packed_desc e;
            memcpy(&e, t + 16ull * i, sizeof(e));
            if (e.flags & VRING_DESC_F_INDIRECT) {
                vd_queue_fail(q, "queue %d: nested indirect descriptor table at %s %u", q->index, w->what, w->at);
                return -1;
            }
            if (map_buffer(q, w, e.addr, e.len, e.flags & VRING_DESC_F_WRITE) < 0)
                return -1;
        }
        return 0;
    }
    if (map_buffer(q, w, d->addr, d->len, d->flags & VRING_DESC_F_WRITE) < 0)
        return -1;
    return !!(d->flags & VRING_DESC_F_NEXT);
}

/* Packed: walk the n descriptors at d, copies kept by inflight.c of a
 * chain taken before a restart (its ring slots may be reused by now). */
int vd_ring_map_packed(struct vd_queue *q, const struct vring_packed_desc *d, int n, struct vd_chain *c,
                       struct iovec *iov, int maxiov)
{
    struct walk w;
    walk_begin(&w, 1, c, iov, maxiov, c->pos);
    for (int i = 0; i < n; i++) {
        int more = map_packed_desc(q, &w, &d[i]);
        if (more < 0)
            return -1;
        if (!more && i + 1 != n) {
            vd_queue_fail(q, "queue %d: a chain kept in the inflight region ends after %d of its %d descriptors",
                          q->index, i + 1, n);
            return -1;
        }
    }
    return 0;
}

static inline int packed_avail(const struct vd_queue *q, uint16_t flags)
{
    int avail = !!(flags & VRING_PACKED_DESC_F_AVAIL), used = !!(flags & VRING_PACKED_DESC_F_USED);
    return avail == q->avail_wrap && used != q->avail_wrap;
}

static inline uint16_t packed_flags_at(const struct vd_queue *q, uint32_t pos)
{
    return vd_rd16(q->desc + 16ull * pos + PDESC_FLAGS);
}

/* Packed: walk the chain at last_avail, which the driver made available. */
static int peek_packed(struct vd_queue *q, struct vd_chain *c, struct iovec *iov, int maxiov)
{
    struct walk w;
    struct vring_packed_desc d;
    uint32_t pos = q->last_avail;
    walk_begin(&w, 1, c, iov, maxiov, (uint16_t)pos);
    c->pos = (uint16_t)pos;
    for (uint32_t n = 1;; n++) {
        memcpy(&d, q->desc + 16ull * pos, sizeof(d));
        int more = map_packed_desc(q, &w, &d);
        if (more < 0)
            return -1;
        if (!more) {
            /* The buffer id sits in the chain's last descriptor. */
            if (d.id >= q->num) {
                vd_queue_fail(q, "queue %d: buffer id %u at position %u is beyond the ring size %u", q->index,
                              d.id, (unsigned)pos, q->num);
                return -1;
            }
            c->id = d.id;
            c->ndesc = (uint16_t)n;
            return 0;
        }
        if (n >= q->num) {
            vd_queue_fail(q, "queue %d: descriptor chain at position %u is longer than the ring of %u", q->index,
                          c->pos, q->num);
            return -1;
        }
        if (++pos == q->num)
            pos = 0;
    }
}

/* Walk the next chain the driver made available into c and iov, without
 * taking it (vd_ring_advance does); -1 after failing the queue.  Only after
 * vd_ring_pending said there is one. */
int vd_ring_peek(struct vd_queue *q, struct vd_chain *c, struct iovec *iov, int maxiov)
{
    if (q->packed)
        return peek_packed(q, c, iov, maxiov);
    uint16_t head = vd_rd16(q->avail + AVAIL_RING + 2 * (q->last_avail % q->num));
    return vd_ring_map_split(q, head, c, iov, maxiov);
}

/* Move a packed position on by n descriptors. */
static inline void packed_move(const struct vd_queue *q, uint16_t *pos, uint16_t *wrap, uint32_t n)
{
    uint32_t p = *pos + n;
    if (p >= q->num) {
        p -= q->num;
        *wrap ^= 1;
    }
    *pos = (uint16_t)p;
}

void vd_ring_advance(struct vd_queue *q, const struct vd_chain *c)
{
    if (q->packed)
        packed_move(q, &q->last_avail, &q->avail_wrap, c->ndesc);
    else
        q->last_avail++;
}

/* ---------------------------------------------------------------- used entries and notifications */

static inline int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

/* Make the used entries visible (a driver that polls sees them at once). */
void vd_ring_expose_used(struct vd_queue *q)
{
    if (q->packed) {
        if (q->batch_open) {
            /* The batch's other descriptors are written; its first one's
             * flags make them all the driver's (2.8.21.1). */
            uint8_t *f = q->desc + 16ull * q->batch_pos + PDESC_FLAGS;
            __atomic_store_n((uint16_t *)f, q->batch_flags, __ATOMIC_RELEASE);
            log_host(q, f, 2);
            q->batch_open = 0;
        }
        return;
    }
    __atomic_thread_fence(__ATOMIC_RELEASE); /* ring entries before idx */
    vd_wr16(q->used + USED_IDX, q->used_idx);
    log_used(q, USED_IDX, 2);
}

/* Packed: a position and wrap counter as one index that runs over two laps,
 * so that distances between them are plain subtractions modulo 2 * num. */
static inline uint32_t lap_index(const struct vd_queue *q, uint16_t pos, uint16_t wrap)
{
    return pos + (wrap ? 0 : q->num);
}

static int packed_wants_signal(struct vd_queue *q)
{
    uint16_t flags = vd_rd16(q->avail + EVENT_FLAGS);
    if (flags == VRING_EVENT_F_DISABLE)
        return 0;
    if (flags != VRING_EVENT_F_DESC || !q->event_idx)
        return 1;
    /* Descriptor events: signal when the entry the driver named (offset,
     * wrap) was written since the last decision. */
    uint16_t off_wrap = vd_rd16(q->avail + EVENT_OFF_WRAP);
    uint32_t laps = 2 * q->num;
    if (q->used_puts - q->signalled_puts >= laps || (off_wrap & 0x7fff) >= q->num)
        return 1;
    uint32_t old = lap_index(q, q->signalled_used, q->signalled_wrap);
    uint32_t now = lap_index(q, q->used_idx, q->used_wrap);
    uint32_t ev = lap_index(q, off_wrap & 0x7fff, off_wrap >> 15);
    return (ev + laps - old) % laps < (now + laps - old) % laps;
}

/* End of a batch that began at used index `old` (split): make its entries
 * visible and signal the driver once if it wants it for any of them. */
void vd_ring_publish_used(struct vd_queue *q, uint16_t old)
{
    if (q->used_puts == q->signalled_puts)
        return;
    vd_ring_expose_used(q);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* entries before reading the driver's suppression state */
    int notify;
    if (q->packed) {
        notify = packed_wants_signal(q);
        q->signalled_used = q->used_idx;
        q->signalled_wrap = q->used_wrap;
    } else if (q->event_idx) {
        uint16_t now = q->used_idx;
        uint16_t prev = q->signalled_valid ? q->signalled_used : old;
        notify = need_event(used_event(q), now, prev);
        q->signalled_used = now;
        q->signalled_valid = 1;
    } else {
        notify = !(avail_flags(q) & VRING_AVAIL_F_NO_INTERRUPT);
    }
    q->signalled_puts = q->used_puts;
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
    if (q->packed) {
        uint16_t flags = on ? VRING_EVENT_F_ENABLE : VRING_EVENT_F_DISABLE;
        int wrote = 0;
        if (on && q->event_idx) {
            /* a kick when the driver makes the next position available */
            vd_wr16(q->used + EVENT_OFF_WRAP, (uint16_t)(q->last_avail | q->avail_wrap << 15));
            flags = VRING_EVENT_F_DESC;
            wrote = 1;
        }
        /* Disabled explicitly, not by leaving a descriptor event behind us
         * as split rings do: positions repeat every two laps, which on a
         * small ring is every few requests (a kick each time). */
        if (vd_rd16(q->used + EVENT_FLAGS) != flags) {
            __atomic_store_n((uint16_t *)(q->used + EVENT_FLAGS), flags, __ATOMIC_RELEASE);
            wrote = 1;
        }
        if (wrote)
            log_host(q, q->used, 4);
    } else if (q->event_idx) {
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

static void put_used_packed(struct vd_queue *q, uint16_t id, uint16_t ndesc, uint32_t len)
{
    uint8_t *d = q->desc + 16ull * q->used_idx;
    uint16_t flags = q->used_wrap ? (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED) : 0;
    memcpy(d + PDESC_ID, &id, 2);
    memcpy(d + PDESC_LEN, &len, 4);
    if (!q->batch_open) {
        q->batch_open = 1;
        q->batch_pos = q->used_idx;
        q->batch_flags = flags;
    } else {
        __atomic_store_n((uint16_t *)(d + PDESC_FLAGS), flags, __ATOMIC_RELEASE);
    }
    log_host(q, d, 16);
    packed_move(q, &q->used_idx, &q->used_wrap, ndesc);
}

/* Hand a chain back: id (split head, packed buffer id), ndesc descriptors
 * (packed: how far the used position moves), len bytes written. */
void vd_ring_put_used(struct vd_queue *q, uint16_t id, uint16_t ndesc, uint32_t len)
{
    q->used_puts++;
    if (q->packed) {
        put_used_packed(q, id, ndesc, len);
        return;
    }
    uint64_t off = USED_RING + 8ull * (q->used_idx % q->num);
    uint8_t *elem = q->used + off;
    uint32_t id32 = id;
    memcpy(elem, &id32, 4);
    memcpy(elem + 4, &len, 4);
    log_used(q, off, 8);
    q->used_idx++;
}

void vd_ring_read_fresh_used(struct vd_queue *q)
{
    if (q->fresh) {
        /* The used ring is the truth about completed requests (also after a
         * reconnect); read it here, under the worker's SIGBUS guard.  A
         * packed ring has no such index: SET_VRING_BASE and the inflight
         * region say where we are. */
        if (!q->packed)
            q->used_idx = vd_rd16(q->used + USED_IDX);
        q->fresh = 0;
    }
}

/* Chains the driver made available that were not taken yet, or -1 after
 * marking the queue broken (the index jumped by more than the ring).  Split:
 * their number (0..num); packed: 1 or 0 (a chain's length is known only
 * once it is walked).  A positive answer is ordered before the reads of the
 * entries. */
int vd_ring_pending(struct vd_queue *q)
{
    if (q->packed) {
        if (!packed_avail(q, packed_flags_at(q, q->last_avail)))
            return 0;
        __atomic_thread_fence(__ATOMIC_ACQUIRE); /* flags before the rest of the descriptors */
        return 1;
    }
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

static void prefetch_buffer(const struct vd_queue *q, uint64_t addr, uint16_t flags)
{
    if (flags & VRING_DESC_F_INDIRECT)
        return;
    const uint8_t *h = vd_mem_gpa(q->dev->mem, addr, 1);
    if (h && (flags & VRING_DESC_F_WRITE))
        __builtin_prefetch(h, 1);
    else if (h)
        __builtin_prefetch(h, 0);
}

/* Split: the descriptor (buffer 0) or first buffer line (1) of the chain at
 * avail position pos, which the driver published. */
static void prefetch_split(const struct vd_queue *q, uint16_t pos, int buffer)
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
    prefetch_buffer(q, desc.addr, desc.flags);
}

/* Start loading what the chains after the one at last_avail will need: the
 * descriptor of the one desc_ahead chains on, and the first line of the
 * buffer of the one buf_ahead on (its descriptor came in a step earlier).
 * The next requests' lines then arrive while this one is served, instead of
 * one cache miss after another; the first touch of a buffer the driver just
 * wrote is the costliest read of a request.  Split: for chains known to be
 * there (pending).  Packed: the slots as many positions on, i.e. guessing
 * one descriptor per chain (the common case), when the driver made them
 * available.  A prefetch never faults: bad values cost nothing here and are
 * caught when the chain is really walked. */
void vd_ring_prefetch_ahead(const struct vd_queue *q, int pending, unsigned desc_ahead, unsigned buf_ahead)
{
    if (!q->packed) {
        if (pending > (int)desc_ahead)
            prefetch_split(q, (uint16_t)(q->last_avail + desc_ahead), 0);
        if (pending > (int)buf_ahead)
            prefetch_split(q, (uint16_t)(q->last_avail + buf_ahead), 1);
        return;
    }
    uint16_t pos = q->last_avail, wrap = q->avail_wrap;
    packed_move(q, &pos, &wrap, desc_ahead % q->num);
    __builtin_prefetch(q->desc + 16ull * pos);
    pos = q->last_avail;
    wrap = q->avail_wrap;
    packed_move(q, &pos, &wrap, buf_ahead % q->num);
    struct vring_packed_desc d;
    memcpy(&d, q->desc + 16ull * pos, sizeof(d));
    int avail = !!(d.flags & VRING_PACKED_DESC_F_AVAIL), used = !!(d.flags & VRING_PACKED_DESC_F_USED);
    if (avail == wrap && used != wrap)
        prefetch_buffer(q, d.addr, d.flags);
}

/* What status shows as the driver's side: split its avail index; packed
 * our position, plus one if the driver made the next chain available. */
uint16_t vd_ring_driver_avail(const struct vd_queue *q)
{
    if (q->packed)
        return (uint16_t)(q->last_avail + packed_avail(q, packed_flags_at(q, q->last_avail)));
    return avail_idx(q);
}

static int driver_added(const struct vd_queue *q)
{
    if (q->packed)
        return packed_avail(q, packed_flags_at(q, q->last_avail));
    return avail_idx(q) != q->last_avail;
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
    if (pending > 0 && !q->packed)
        q->avail_known = (uint16_t)pending;
    return pending;
}

int vd_queue_pop(struct vd_queue *q, struct vd_req *req, struct iovec *iov, int maxiov)
{
    vd_ring_read_fresh_used(q);
    int pending = known_pending(q);
    if (pending <= 0)
        return pending;
    struct vd_chain c;
    if (vd_ring_peek(q, &c, iov, maxiov) < 0)
        return -1;
    vd_ring_advance(q, &c);
    vd_req_from_chain(req, &c, iov);
    if (!q->packed)
        q->avail_known--;
    vd_ring_prefetch_ahead(q, q->avail_known, 1, 0);
    return 1;
}

int vd_queue_has_avail(struct vd_queue *q)
{
    vd_ring_read_fresh_used(q);
    /* requests left to redo after a restart count as available work */
    return q->avail_known || driver_added(q) || q->resubmit_pos < q->nresubmit;
}

uint32_t vd_queue_avail_mark(const struct vd_queue *q)
{
    return q->last_avail | (uint32_t)q->avail_wrap << 16;
}

void vd_queue_rewind(struct vd_queue *q, uint32_t mark, int popped)
{
    if (!popped)
        return;
    if (!q->packed)
        q->avail_known += (uint16_t)(q->last_avail - (uint16_t)mark);
    q->last_avail = (uint16_t)mark;
    q->avail_wrap = (uint16_t)(mark >> 16);
}

void vd_queue_push(struct vd_queue *q, uint16_t id, uint16_t ndesc, uint32_t len)
{
    vd_ring_put_used(q, id, ndesc, len);
    q->st.requests++;
    q->st.in_bytes += len;
}

void vd_queue_flush(struct vd_queue *q)
{
    vd_ring_publish_used(q, q->packed ? 0 : vd_rd16(q->used + USED_IDX));
}

/* Ask for a kick when the driver adds buffers; returns 1 if some arrived
 * meanwhile (then keep going instead of waiting). */
int vd_queue_want_kick(struct vd_queue *q)
{
    vd_ring_notify_enable(q, 1);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return driver_added(q);
}
