/* Virtqueue, driver side: split (virtio 1.2 section 2.7) and packed (2.8)
 * rings.  See virtq.h. */
#include "virtq.h"

/* split, EVENT_IDX, polling: used_event is put this far ahead of the used
 * index, and moved again once it is less than EVENT_MIN ahead (a write every
 * 0x4000 completions rather than every one) */
#define EVENT_SPACE 0x8000
#define EVENT_MIN 0x4000

/* split, EVENT_IDX: the slots after the two rings (2.7.10) */
static inline u16 *used_event_slot(struct virtq *q)
{
    return &q->avail->ring[q->size];
}

static inline u16 *avail_event_slot(struct virtq *q)
{
    return (u16 *)((u8 *)q->used + 4 + 8ull * q->size);
}

static int fail(struct virtq *q, const char *fmt, ...) PRINTF_LIKE_VQ(2, 3);
static int fail(struct virtq *q, const char *fmt, ...)
{
    va_list ap;
    int n = snprintf(q->error, sizeof(q->error), "virtq %u: ", q->index);
    if (n < 0 || (u32)n >= sizeof(q->error))
        n = 0;
    va_start(ap, fmt);
    vsnprintf(q->error + n, sizeof(q->error) - (u32)n, fmt, ap);
    va_end(ap);
    q->broken = 1;
    vq_report(q->error);
    return -1;
}

/* ---------------------------------------------------------------- set-up */

/* The private state, per id: cookie, seq, in_len, [pend], links, ndesc, busy. */
static u64 state_bytes(u16 size, int packed)
{
    return (u64)size * (sizeof(void *) + 4 + 4 + (packed ? 4 : 0) + 2 + 2 + 1);
}

void virtq_sizes(u16 size, int packed, u16 indirect_max, struct virtq_sizes *s)
{
    memset(s, 0, sizeof(*s));
    s->desc = 16ull * size;
    s->desc_align = 16;
    if (packed) {
        s->driver = s->device = sizeof(struct vring_packed_event);
        s->driver_align = s->device_align = 4;
    } else {
        s->driver = 6 + 2ull * size; /* flags, idx, ring, used_event */
        s->driver_align = 2;
        s->device = 6 + 8ull * size; /* flags, idx, ring, avail_event */
        s->device_align = 4;
    }
    s->indirect = 16ull * size * indirect_max;
    s->indirect_align = 16;
    s->state = state_bytes(size, packed);
    s->state_align = 8;
}

static int misaligned(const void *p, u64 gpa, u64 align)
{
    return ((u64)(uintptr_t)p | gpa) & (align - 1);
}

int virtq_init(struct virtq *q, u16 index, u16 size, unsigned flags, u16 indirect_max, const struct virtq_mem *m)
{
    int packed = !!(flags & VIRTQ_F_PACKED);
    memset(q, 0, sizeof(*q));
    q->index = index;
    if (size == 0 || size > 32768 || (!packed && (size & (size - 1))))
        return fail(q, "size %u: a %s ring holds 1..32768 entries%s", size, packed ? "packed" : "split",
                    packed ? "" : ", a power of two");
    struct virtq_sizes s;
    virtq_sizes(size, packed, indirect_max, &s);
    if (!m->desc || !m->driver || !m->device || !m->state || (indirect_max && !m->indirect))
        return fail(q, "memory missing");
    if (misaligned(m->desc, m->desc_gpa, s.desc_align) || misaligned(m->driver, m->driver_gpa, s.driver_align) ||
        misaligned(m->device, m->device_gpa, s.device_align) ||
        (indirect_max && misaligned(m->indirect, m->indirect_gpa, s.indirect_align)) ||
        misaligned(m->state, 0, s.state_align))
        return fail(q, "ring memory is misaligned");
    q->size = size;
    q->packed = packed;
    q->event_idx = !!(flags & VIRTQ_F_EVENT_IDX);
    q->indirect_max = indirect_max;
    q->desc_gpa = m->desc_gpa;
    q->driver_gpa = m->driver_gpa;
    q->device_gpa = m->device_gpa;
    if (packed) {
        q->pdesc = m->desc;
        q->driver_event = m->driver;
        q->device_event = m->device;
    } else {
        q->desc = m->desc;
        q->avail = m->driver;
        q->used = m->device;
    }
    q->ind = m->indirect;
    q->ind_gpa = m->indirect_gpa;

    u8 *st = m->state;
    q->cookie = (void **)st;
    st += sizeof(void *) * size;
    q->seq = (u32 *)st;
    st += 4ull * size;
    q->in_len = (u32 *)st;
    st += 4ull * size;
    if (packed) {
        q->pend = (u32 *)st;
        st += 4ull * size;
    }
    q->links = (u16 *)st;
    st += 2ull * size;
    q->ndesc = (u16 *)st;
    st += 2ull * size;
    q->busy = st;

    /* split: the free descriptors; packed: the free buffer ids (the last
     * link, size, is never followed) */
    for (u32 i = 0; i < size; i++)
        q->links[i] = (u16)(i + 1);
    q->free_head = 0;
    q->num_free = size;
    q->avail_wrap = q->used_wrap = 1; /* packed: both counters start at 1 (2.8.1) */
    virtq_disable_intr(q);
    return 0;
}

int virtq_descs_needed(const struct virtq *q, int n)
{
    return (q->indirect_max && n > 1 && n <= q->indirect_max) ? 1 : n;
}

/* ---------------------------------------------------------------- adding */

static u16 add_split(struct virtq *q, const struct vq_buf *bufs, int n_out, int n, int indirect)
{
    u16 head = q->free_head;
    if (indirect) {
        struct vring_desc *t = (struct vring_desc *)(q->ind + 16ull * head * q->indirect_max);
        for (int i = 0; i < n; i++) {
            t[i].addr = bufs[i].addr;
            t[i].len = bufs[i].len;
            t[i].flags = (u16)((i >= n_out ? VRING_DESC_F_WRITE : 0) | (i + 1 < n ? VRING_DESC_F_NEXT : 0));
            t[i].next = (u16)(i + 1 < n ? i + 1 : 0);
        }
        q->desc[head].addr = q->ind_gpa + 16ull * head * q->indirect_max;
        q->desc[head].len = (u32)(16 * n);
        q->desc[head].flags = VRING_DESC_F_INDIRECT;
        q->desc[head].next = 0;
        q->free_head = q->links[head];
    } else {
        u16 d = head, last = head;
        for (int i = 0; i < n; i++) {
            last = d;
            q->desc[d].addr = bufs[i].addr;
            q->desc[d].len = bufs[i].len;
            q->desc[d].flags = (u16)((i >= n_out ? VRING_DESC_F_WRITE : 0) | (i + 1 < n ? VRING_DESC_F_NEXT : 0));
            d = q->links[d];
            q->desc[last].next = i + 1 < n ? d : 0;
        }
        q->free_head = d;
    }
    q->avail->ring[q->next_avail & (q->size - 1)] = head;
    q->next_avail++;
    return head;
}

/* AVAIL = the wrap counter, USED = its inverse: available in that lap (2.8.1) */
static inline u16 avail_bits(u16 wrap)
{
    return wrap ? VRING_PACKED_DESC_F_AVAIL : VRING_PACKED_DESC_F_USED;
}

static u16 add_packed(struct virtq *q, const struct vq_buf *bufs, int n_out, int n, int indirect, u16 need)
{
    u16 id = q->free_head;
    q->free_head = q->links[id];
    u16 pos = q->next_avail, wrap = q->avail_wrap, head = pos, head_flags;
    if (indirect) {
        /* the table's entries follow each other; WRITE is their only flag (2.8.7) */
        struct vring_packed_desc *t = (struct vring_packed_desc *)(q->ind + 16ull * id * q->indirect_max);
        for (int i = 0; i < n; i++) {
            t[i].addr = bufs[i].addr;
            t[i].len = bufs[i].len;
            t[i].id = 0;
            t[i].flags = i >= n_out ? VRING_DESC_F_WRITE : 0;
        }
        q->pdesc[pos].addr = q->ind_gpa + 16ull * id * q->indirect_max;
        q->pdesc[pos].len = (u32)(16 * n);
        q->pdesc[pos].id = id;
        head_flags = VRING_DESC_F_INDIRECT | avail_bits(wrap);
        if (++pos == q->size) {
            pos = 0;
            wrap ^= 1;
        }
    } else {
        head_flags = 0;
        for (int i = 0; i < n; i++) {
            struct vring_packed_desc *d = &q->pdesc[pos];
            u16 f = (u16)((i >= n_out ? VRING_DESC_F_WRITE : 0) | (i + 1 < n ? VRING_DESC_F_NEXT : 0) |
                          avail_bits(wrap));
            d->addr = bufs[i].addr;
            d->len = bufs[i].len;
            d->id = id; /* the device reads it from the last one */
            if (i == 0)
                head_flags = f; /* written by virtq_publish, after the rest */
            else
                WRITE_ONCE(d->flags, f);
            if (++pos == q->size) {
                pos = 0;
                wrap ^= 1;
            }
        }
    }
    q->pend[head] = head_flags | (u32)need << 16;
    q->next_avail = pos;
    q->avail_wrap = wrap;
    return id;
}

int virtq_add(struct virtq *q, const struct vq_buf *bufs, int n_out, int n_in, void *cookie)
{
    int n = n_out + n_in;
    if (n <= 0 || n_out < 0 || n_in < 0 || q->broken)
        return -1;
    int need = virtq_descs_needed(q, n);
    if (need > q->num_free)
        return -1;
    int indirect = need == 1 && n > 1;
    u64 in_len = 0;
    for (int i = n_out; i < n; i++)
        in_len += bufs[i].len;
    u16 id = q->packed ? add_packed(q, bufs, n_out, n, indirect, (u16)need) : add_split(q, bufs, n_out, n, indirect);
    q->num_free = (u16)(q->num_free - need);
    q->ndesc[id] = (u16)need;
    q->cookie[id] = cookie;
    q->busy[id] = 1;
    q->seq[id] = q->add_seq++;
    q->in_len[id] = in_len > 0xffffffffu ? 0xffffffffu : (u32)in_len;
    q->inflight++;
    q->stat_adds++;
    return id;
}

void virtq_publish(struct virtq *q)
{
    if (!q->packed) {
        vq_wmb(); /* descriptors and ring entries before the index */
        WRITE_ONCE(q->avail->idx, q->next_avail);
        q->pub_seq = q->add_seq;
        return;
    }
    u32 chains = q->add_seq - q->pub_seq;
    if (!chains)
        return;
    vq_wmb(); /* every chain's other descriptors before the heads' flags */
    u16 pos = q->pub_pos;
    for (u32 c = 0; c < chains; c++) {
        u32 p = q->pend[pos];
        WRITE_ONCE(q->pdesc[pos].flags, (u16)p);
        q->kick_added += p >> 16;
        u32 next = pos + (p >> 16);
        pos = (u16)(next >= q->size ? next - q->size : next);
    }
    q->pub_pos = pos;
    q->pub_seq = q->add_seq;
}

static int packed_need_kick(struct virtq *q, u32 added)
{
    u16 flags = READ_ONCE(q->device_event->flags);
    if (flags == VRING_EVENT_F_DISABLE)
        return 0;
    if (flags != VRING_EVENT_F_DESC || !q->event_idx)
        return 1; /* ENABLE, or a value we cannot act on: notify */
    u16 off_wrap = READ_ONCE(q->device_event->off_wrap);
    u16 event = off_wrap & ~VRING_PACKED_EVENT_WRAP;
    if (event >= q->size || added >= q->size)
        return 1;
    /* Positions as one 16-bit count: the device's event is in our lap or,
     * with the other wrap counter, in the one before. */
    u16 now = q->next_avail, old = (u16)(now - added);
    if ((off_wrap >> 15) != q->avail_wrap)
        event = (u16)(event - q->size);
    return vring_need_event(event, now, old);
}

int virtq_kick_prepare(struct virtq *q)
{
    int need;
    virtq_publish(q);
    if (q->packed) {
        u32 added = q->kick_added;
        if (!added)
            return 0;
        q->kick_added = 0;
        vq_mb(); /* the flags stores before reading the device's suppression state */
        need = packed_need_kick(q, added);
    } else {
        u16 old = q->kick_old, now = q->next_avail;
        if (old == now)
            return 0;
        q->kick_old = now;
        vq_mb(); /* the index store before reading the device's suppression state */
        if (q->event_idx)
            need = vring_need_event(READ_ONCE(*avail_event_slot(q)), now, old);
        else
            need = !(READ_ONCE(q->used->flags) & VRING_USED_F_NO_NOTIFY);
    }
    if (need)
        q->stat_kicks++;
    else
        q->stat_kicks_skipped++;
    return need;
}

/* ---------------------------------------------------------------- completions */

static inline int packed_is_used(const struct virtq *q, u16 flags)
{
    int avail = !!(flags & VRING_PACKED_DESC_F_AVAIL), used = !!(flags & VRING_PACKED_DESC_F_USED);
    return avail == used && used == q->used_wrap;
}

int virtq_has_used(const struct virtq *q)
{
    if (q->packed)
        return packed_is_used(q, READ_ONCE(q->pdesc[q->last_used].flags));
    return READ_ONCE(q->used->idx) != q->last_used;
}

u16 virtq_used_idx(const struct virtq *q)
{
    if (q->packed)
        return (u16)(q->last_used | (q->used_wrap ? VRING_PACKED_EVENT_WRAP : 0));
    return READ_ONCE(q->used->idx);
}

/* Checks common to both layouts of a used entry naming `id` with `*len`.
 * A chain with no device-writable buffer has nothing to report a length
 * of: some devices (DPDK's vhost on packed rings) put the bytes they read
 * there, so it is ignored (reported as 0) rather than refused. */
static int check_used(struct virtq *q, u32 id, u32 *len, const char *where, u32 at)
{
    if (id >= q->size || !q->busy[id])
        return fail(q, "used %s %u names %s %u, which is not in flight", where, at, q->packed ? "buffer id" : "head",
                    id);
    if ((int32_t)(q->pub_seq - q->seq[id]) <= 0)
        return fail(q, "used %s %u names %s %u, which was never made available", where, at,
                    q->packed ? "buffer id" : "head", id);
    if (*len > q->in_len[id]) {
        if (q->in_len[id])
            return fail(q, "used %s %u: %u bytes written into a buffer of %u writable bytes", where, at, *len,
                        q->in_len[id]);
        q->stat_len_ignored++;
        *len = 0;
    }
    return 0;
}

static void release(struct virtq *q, u16 id, void **cookie)
{
    if (!q->packed) {
        u16 tail = id;
        for (u16 i = 1; i < q->ndesc[id]; i++)
            tail = q->links[tail];
        q->links[tail] = q->free_head;
    } else {
        q->links[id] = q->free_head;
    }
    q->free_head = id;
    q->num_free = (u16)(q->num_free + q->ndesc[id]);
    q->busy[id] = 0;
    q->inflight--;
    q->stat_completions++;
    if (cookie)
        *cookie = q->cookie[id];
    q->cookie[id] = 0;
}

static int poll_split(struct virtq *q, void **cookie, u32 *len)
{
    u16 used_idx = READ_ONCE(q->used->idx);
    if (used_idx == q->last_used)
        return 0;
    u16 published = (u16)(q->inflight - (q->add_seq - q->pub_seq));
    if ((u16)(used_idx - q->last_used) > published)
        return fail(q, "used idx %u is %u ahead of %u with only %u in flight", used_idx,
                    (u16)(used_idx - q->last_used), q->last_used, published);
    vq_rmb(); /* the index before the entry */
    const struct vring_used_elem *e = &q->used->ring[q->last_used & (q->size - 1)];
    u32 id = READ_ONCE(e->id), l = READ_ONCE(e->len);
    if (check_used(q, id, &l, "entry", q->last_used) < 0)
        return -1;
    release(q, (u16)id, cookie);
    q->last_used++;
    if (q->event_idx && !q->intr && (u16)(q->used_event - q->last_used) < EVENT_MIN) {
        q->used_event = (u16)(q->last_used + EVENT_SPACE);
        WRITE_ONCE(*used_event_slot(q), q->used_event);
    }
    if (len)
        *len = l;
    return 1;
}

static int poll_packed(struct virtq *q, void **cookie, u32 *len)
{
    struct vring_packed_desc *d = &q->pdesc[q->last_used];
    if (!packed_is_used(q, READ_ONCE(d->flags)))
        return 0;
    if (q->inflight == q->add_seq - q->pub_seq)
        return fail(q, "used descriptor at position %u with nothing in flight", q->last_used);
    vq_rmb(); /* the flags before the rest */
    u32 id = READ_ONCE(d->id), l = READ_ONCE(d->len);
    if (check_used(q, id, &l, "descriptor at position", q->last_used) < 0)
        return -1;
    u32 next = q->last_used + q->ndesc[id];
    if (next >= q->size) {
        next -= q->size;
        q->used_wrap ^= 1;
    }
    q->last_used = (u16)next;
    release(q, (u16)id, cookie);
    if (len)
        *len = l;
    return 1;
}

int virtq_poll(struct virtq *q, void **cookie, u32 *len)
{
    if (q->broken)
        return -1;
    return q->packed ? poll_packed(q, cookie, len) : poll_split(q, cookie, len);
}

/* ---------------------------------------------------------------- used-buffer notifications */

int virtq_enable_intr(struct virtq *q)
{
    q->intr = 1;
    if (q->packed) {
        if (q->event_idx) {
            /* at the used descriptor we read next */
            WRITE_ONCE(q->driver_event->off_wrap,
                       (u16)(q->last_used | (q->used_wrap ? VRING_PACKED_EVENT_WRAP : 0)));
            vq_wmb();
            WRITE_ONCE(q->driver_event->flags, VRING_EVENT_F_DESC);
        } else {
            WRITE_ONCE(q->driver_event->flags, VRING_EVENT_F_ENABLE);
        }
    } else if (q->event_idx) {
        q->used_event = q->last_used;
        WRITE_ONCE(*used_event_slot(q), q->used_event);
    } else {
        WRITE_ONCE(q->avail->flags, 0);
    }
    vq_mb(); /* the request before looking at the ring again */
    return virtq_has_used(q);
}

void virtq_disable_intr(struct virtq *q)
{
    q->intr = 0;
    if (q->packed)
        WRITE_ONCE(q->driver_event->flags, VRING_EVENT_F_DISABLE);
    else if (q->event_idx) { /* no flag with EVENT_IDX: used_event far ahead (kept so by poll) */
        q->used_event = (u16)(q->last_used + EVENT_SPACE);
        WRITE_ONCE(*used_event_slot(q), q->used_event);
    }
    else
        WRITE_ONCE(q->avail->flags, VRING_AVAIL_F_NO_INTERRUPT);
}

/* ---------------------------------------------------------------- guest programs */

#ifndef VIRTQ_LIBC
#include "virtio_mmio.h"

void virtq_alloc(struct virtq *q, u16 index, u16 size, unsigned flags, u16 indirect_max)
{
    u16 n = 1;
    if (flags & VIRTQ_F_PACKED) /* any size will do (2.8) */
        n = size == 0 ? 1 : size > 32768 ? 32768 : size;
    else
        while ((u32)n * 2 <= size && n < 32768)
            n *= 2;
    struct virtq_sizes s;
    virtq_sizes(n, flags & VIRTQ_F_PACKED, indirect_max, &s);
    /* the rings on pages of their own (the split used ring as in the legacy
     * layout: not required, tidy) */
    struct virtq_mem m;
    memset(&m, 0, sizeof(m));
    m.desc = zalloc(s.desc, 4096);
    m.driver = zalloc(s.driver, 64);
    m.device = zalloc(s.device, s.device > 64 ? 4096 : 64);
    if (indirect_max)
        m.indirect = zalloc(s.indirect, 64);
    m.state = zalloc(s.state, 64);
    m.desc_gpa = gpa(m.desc);
    m.driver_gpa = gpa(m.driver);
    m.device_gpa = gpa(m.device);
    m.indirect_gpa = indirect_max ? gpa(m.indirect) : 0;
    if (virtq_init(q, index, n, flags, indirect_max, &m) < 0)
        panic("%s", q->error);
}

int virtq_kick(struct virtq *q)
{
    int need = virtq_kick_prepare(q);
    if (need)
        vdev_notify(q->dev, q->index);
    return need;
}
#endif
