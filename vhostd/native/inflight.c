/* Inflight I/O tracking (vhost-user "Inflight I/O tracking"), both layouts.
 *
 * The front-end keeps a memfd across our restarts; each queue has a region
 * of it where every request we take is marked until its completion is
 * visible to the driver.  A restarted vhostd reads the region back and
 * redoes what is still marked, oldest first.  Completions may come in any
 * order: each one is made visible and forgotten on its own.
 *
 * Both layouts start with u64 features (the virtio features the region was
 * written under: a layout change starts it afresh), u16 version, u16
 * desc_num.
 *
 * Split: u16 last_batch_head, u16 used_idx, then desc_num entries of
 * {u8 inflight, u8 pad[5], u16 next, u64 counter}, one per head descriptor.
 * The used ring's index says which completions the driver may have seen.
 *
 * Packed: u16 free_head, u16 old_free_head, u16 used_idx, u16 old_used_idx,
 * u8 used_wrap_counter, u8 old_used_wrap_counter, padding to 32, then
 * desc_num entries of {u8 inflight, u8 pad, u16 next, u16 last, u16 num,
 * u64 counter, u16 id, u16 flags, u32 len, u64 addr}.  A packed ring has no
 * index of ours in shared memory and the driver reuses ring slots, so the
 * region keeps copies of each pending chain's descriptors (entries linked by
 * next; the first one is marked inflight and holds num and the counter) and
 * our used position.  Which entries are free is rebuilt at recovery; the
 * free list fields are not used.  A completion is written in three steps:
 * the new used position (used_idx) and the entry (old_free_head), then the
 * used descriptor, then the entry unmarked and old_used_idx moved on.  A
 * crash in between is resolved by looking at the ring: the used descriptor
 * was written iff its slot's USED flag has our wrap counter.
 *
 * What is read back from the region is checked like everything else. */
#define _GNU_SOURCE
#include <string.h>
#include <unistd.h>

#include "vd.h"

#define IF_FEATURES 0
#define IF_VERSION 8
#define IF_DESC_NUM 10
/* split */
#define IF_LAST_BATCH_HEAD 12
#define IF_USED_IDX 14
#define IF_DESC 16
#define IF_ENTRY 16
/* packed */
#define PK_OLD_FREE_HEAD 14
#define PK_USED_IDX 16
#define PK_OLD_USED_IDX 18
#define PK_USED_WRAP 20
#define PK_OLD_USED_WRAP 21
#define PK_DESC 32
#define PK_ENTRY 32
#define PE_INFLIGHT 0
#define PE_NEXT 2
#define PE_LAST 4
#define PE_NUM 6
#define PE_COUNTER 8
#define PE_ID 16
#define PE_FLAGS 18
#define PE_LEN 20
#define PE_ADDR 24

/* Big enough for either layout: GET_INFLIGHT_FD comes before the features. */
uint64_t vd_inflight_queue_bytes(uint32_t queue_size)
{
    return (PK_DESC + (uint64_t)PK_ENTRY * queue_size + 63) & ~63ull;
}

static inline uint8_t *if_desc(struct vd_queue *q, uint16_t head)
{
    return q->inflight + IF_DESC + IF_ENTRY * head;
}

static inline uint8_t *pk_entry(struct vd_queue *q, uint16_t e)
{
    return q->inflight + PK_DESC + PK_ENTRY * (uint32_t)e;
}

static inline uint16_t rd16_at(const uint8_t *p, int off)
{
    uint16_t v;
    memcpy(&v, p + off, 2);
    return v;
}

static inline void wr16_at(uint8_t *p, int off, uint16_t v)
{
    memcpy(p + off, &v, 2);
}

static void free_entries(struct vd_queue *q, uint16_t e)
{
    uint16_t n = rd16_at(pk_entry(q, e), PE_NUM);
    for (uint16_t i = 0; i < n && e < q->num && q->if_nfree < q->num; i++) {
        q->if_free[q->if_nfree++] = e;
        e = rd16_at(pk_entry(q, e), PE_NEXT);
    }
}

static int begin_packed(struct vd_queue *q, const struct vd_chain *c)
{
    if (c->ndesc > q->if_nfree) {
        vd_queue_fail(q, "queue %d: more descriptors in flight than the ring of %u holds", q->index, q->num);
        return -1;
    }
    uint16_t first = q->if_free[q->if_nfree - 1], prev = first;
    uint32_t pos = c->pos;
    for (uint16_t i = 0; i < c->ndesc; i++) {
        uint16_t e = q->if_free[--q->if_nfree];
        uint8_t *ent = pk_entry(q, e);
        struct vring_packed_desc d;
        memcpy(&d, q->desc + 16ull * pos, sizeof(d));
        memset(ent, 0, PK_ENTRY);
        wr16_at(ent, PE_ID, d.id);
        wr16_at(ent, PE_FLAGS, d.flags);
        memcpy(ent + PE_LEN, &d.len, 4);
        memcpy(ent + PE_ADDR, &d.addr, 8);
        if (i)
            wr16_at(pk_entry(q, prev), PE_NEXT, e);
        prev = e;
        if (++pos == q->num)
            pos = 0;
    }
    uint8_t *head = pk_entry(q, first);
    uint64_t counter = ++q->inflight_counter;
    wr16_at(head, PE_NUM, c->ndesc);
    wr16_at(head, PE_LAST, prev);
    memcpy(head + PE_COUNTER, &counter, 8);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    head[PE_INFLIGHT] = 1;
    q->if_head[c->id] = first;
    return 0;
}

int vd_inflight_begin(struct vd_queue *q, const struct vd_chain *c)
{
    if (q->packed)
        return begin_packed(q, c);
    uint64_t counter = ++q->inflight_counter;
    memcpy(if_desc(q, c->id) + 8, &counter, 8);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    if_desc(q, c->id)[0] = 1;
    return 0;
}

/* A request taken and then given back untouched (VD_REQ_RETRY): unmark it. */
void vd_inflight_cancel(struct vd_queue *q, uint16_t id)
{
    if (!q->packed) {
        if_desc(q, id)[0] = 0;
        return;
    }
    uint16_t e = q->if_head[id];
    pk_entry(q, e)[PE_INFLIGHT] = 0;
    free_entries(q, e);
}

static void complete_packed(struct vd_queue *q, uint16_t id, uint16_t ndesc, uint32_t len)
{
    uint16_t e = q->if_head[id];
    uint32_t pos = q->used_idx + ndesc;
    uint8_t wrap = (uint8_t)q->used_wrap;
    if (pos >= q->num) {
        pos -= q->num;
        wrap ^= 1;
    }
    wr16_at(q->inflight, PK_OLD_FREE_HEAD, e);
    wr16_at(q->inflight, PK_USED_IDX, (uint16_t)pos);
    q->inflight[PK_USED_WRAP] = wrap;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    vd_ring_put_used(q, id, ndesc, len);
    vd_ring_expose_used(q);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    pk_entry(q, e)[PE_INFLIGHT] = 0;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    wr16_at(q->inflight, PK_OLD_USED_IDX, (uint16_t)pos);
    q->inflight[PK_OLD_USED_WRAP] = wrap;
    free_entries(q, e);
}

/* Split: the used entry, then this completion visible on its own, then
 * forgotten.  A crash between the two is repaired by recovery through
 * last_batch_head. */
void vd_inflight_complete(struct vd_queue *q, uint16_t id, uint16_t ndesc, uint32_t len)
{
    if (q->packed) {
        complete_packed(q, id, ndesc, len);
        return;
    }
    vd_ring_put_used(q, id, ndesc, len);
    vd_wr16(q->inflight + IF_LAST_BATCH_HEAD, id);
    vd_ring_expose_used(q);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if_desc(q, id)[0] = 0;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    vd_wr16(q->inflight + IF_USED_IDX, q->used_idx);
}

/* Line up n requests with these counters to be redone, oldest first. */
static void sort_resubmit(struct vd_queue *q, uint64_t *counters, int n)
{
    for (int i = 1; i < n; i++) { /* insertion: n <= 1024 and this runs once per start */
        uint64_t c = counters[i];
        uint16_t r = q->resubmit[i];
        int j = i;
        while (j > 0 && counters[j - 1] > c) {
            counters[j] = counters[j - 1];
            q->resubmit[j] = q->resubmit[j - 1];
            j--;
        }
        counters[j] = c;
        q->resubmit[j] = r;
    }
    q->nresubmit = n;
}

static int recover_split(struct vd_queue *q)
{
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
        memcpy(&counters[n], if_desc(q, head) + 8, 8);
        if (counters[n] > top)
            top = counters[n];
        q->resubmit[n++] = (uint16_t)head;
    }
    sort_resubmit(q, counters, n);
    q->inflight_counter = top;
    /* Every request taken is completed (counted in used idx) or in flight. */
    q->last_avail = (uint16_t)(q->used_idx + n);
    q->avail_known = 0;
    return 0;
}

static int recover_packed(struct vd_queue *q)
{
    uint8_t *r = q->inflight;
    uint16_t used = rd16_at(r, PK_USED_IDX), old = rd16_at(r, PK_OLD_USED_IDX);
    uint8_t used_wrap = r[PK_USED_WRAP], old_wrap = r[PK_OLD_USED_WRAP];
    if (used >= q->num || old >= q->num || used_wrap > 1 || old_wrap > 1) {
        vd_queue_fail(q, "queue %d: inflight used position %u/%u (wrap %u/%u) is beyond the ring size %u",
                      q->index, used, old, used_wrap, old_wrap, q->num);
        return -1;
    }
    if (used != old || used_wrap != old_wrap) {
        /* Died in the middle of a completion: was its used descriptor written? */
        uint16_t flags = vd_rd16(q->desc + 16ull * old + 14);
        uint16_t e = rd16_at(r, PK_OLD_FREE_HEAD);
        if (!!(flags & VRING_PACKED_DESC_F_USED) == old_wrap && e < q->num) {
            pk_entry(q, e)[PE_INFLIGHT] = 0;
            old = used;
            old_wrap = used_wrap;
        }
        wr16_at(r, PK_USED_IDX, old);
        wr16_at(r, PK_OLD_USED_IDX, old);
        r[PK_USED_WRAP] = r[PK_OLD_USED_WRAP] = old_wrap;
    }
    q->used_idx = q->signalled_used = old;
    q->used_wrap = q->signalled_wrap = old_wrap;
    uint8_t owned[VD_MAX_QUEUE_SIZE] = {0}, id_seen[VD_MAX_QUEUE_SIZE] = {0};
    uint64_t counters[VD_MAX_QUEUE_SIZE];
    uint64_t top = 0;
    uint32_t taken = 0;
    int n = 0;
    for (uint32_t head = 0; head < q->num; head++) {
        uint8_t *h = pk_entry(q, (uint16_t)head);
        if (!h[PE_INFLIGHT])
            continue;
        uint16_t num = rd16_at(h, PE_NUM), e = (uint16_t)head, id = 0;
        if (num == 0 || num > q->chain_limit || taken + num > q->num) {
            vd_queue_fail(q, "queue %d: inflight entry %u holds a chain of %u descriptors", q->index, head, num);
            return -1;
        }
        for (uint16_t i = 0; i < num; i++) {
            if (e >= q->num || owned[e]) {
                vd_queue_fail(q, "queue %d: inflight chains overlap or leave the region at entry %u", q->index, e);
                return -1;
            }
            owned[e] = 1;
            id = rd16_at(pk_entry(q, e), PE_ID);
            e = rd16_at(pk_entry(q, e), PE_NEXT);
        }
        if (id >= q->num || id_seen[id]) {
            vd_queue_fail(q, "queue %d: inflight chain at entry %u has buffer id %u, out of range or twice",
                          q->index, head, id);
            return -1;
        }
        id_seen[id] = 1;
        q->if_head[id] = (uint16_t)head;
        taken += num;
        memcpy(&counters[n], h + PE_COUNTER, 8);
        if (counters[n] > top)
            top = counters[n];
        q->resubmit[n++] = (uint16_t)head;
    }
    sort_resubmit(q, counters, n);
    q->inflight_counter = top;
    q->if_nfree = 0;
    for (uint32_t e = q->num; e-- > 0;)
        if (!owned[e])
            q->if_free[q->if_nfree++] = (uint16_t)e;
    /* Every descriptor taken is used or in flight. */
    q->last_avail = q->used_idx;
    q->avail_wrap = q->used_wrap;
    struct vd_chain all = {.ndesc = 0};
    uint32_t left = taken;
    while (left) { /* move by at most num at a time: packed positions wrap once per move */
        all.ndesc = (uint16_t)(left < q->num ? left : q->num);
        vd_ring_advance(q, &all);
        left -= all.ndesc;
    }
    return 0;
}

/* Tell the control plane how many requests are redone (its log says so). */
static int note_redo(struct vd_queue *q, int rc)
{
    if (rc == 0 && q->nresubmit) {
        q->redo_noted = q->nresubmit;
        uint64_t one = 1;
        if (q->dev->event_fd >= 0 && write(q->dev->event_fd, &one, sizeof(one)) < 0) {
        }
    }
    return rc;
}

/* Queue start with a region: set it up if fresh, else find what a crashed
 * back-end left unfinished and line it up to be redone, oldest first. */
int vd_inflight_recover(struct vd_queue *q)
{
    uint16_t version = vd_rd16(q->inflight + IF_VERSION), num = vd_rd16(q->inflight + IF_DESC_NUM);
    uint64_t features;
    memcpy(&features, q->inflight + IF_FEATURES, 8);
    int was_packed = !!(features & (1ull << VIRTIO_F_RING_PACKED));
    q->nresubmit = q->resubmit_pos = 0;
    if (q->num > q->inflight_size) {
        vd_queue_fail(q, "queue %d: the inflight area was made for rings of %u descriptors; this one has %u",
                      q->index, q->inflight_size, q->num);
        return -1;
    }
    if (version == 1 && num == q->num && was_packed != q->packed) {
        /* The driver renegotiated the ring layout: nothing of the old one is pending. */
        memset(q->inflight, 0, vd_inflight_queue_bytes(q->num));
        version = num = 0;
    }
    if (version == 0 && num == 0) {
        features = q->dev->features;
        memcpy(q->inflight + IF_FEATURES, &features, 8);
        vd_wr16(q->inflight + IF_DESC_NUM, (uint16_t)q->num);
        if (q->packed) {
            wr16_at(q->inflight, PK_USED_IDX, q->used_idx);
            wr16_at(q->inflight, PK_OLD_USED_IDX, q->used_idx);
            q->inflight[PK_USED_WRAP] = q->inflight[PK_OLD_USED_WRAP] = (uint8_t)q->used_wrap;
            q->if_nfree = 0;
            for (uint32_t e = q->num; e-- > 0;)
                q->if_free[q->if_nfree++] = (uint16_t)e;
        } else {
            vd_wr16(q->inflight + IF_USED_IDX, q->used_idx);
        }
        __atomic_thread_fence(__ATOMIC_RELEASE);
        vd_wr16(q->inflight + IF_VERSION, 1);
        return 0;
    }
    if (version != 1 || num != q->num) {
        vd_queue_fail(q, "queue %d: inflight region has version %u for %u descriptors; the ring has %u",
                      q->index, version, num, q->num);
        return -1;
    }
    return note_redo(q, q->packed ? recover_packed(q) : recover_split(q));
}

int vd_inflight_chain(struct vd_queue *q, int k, struct vd_chain *c, struct iovec *iov, int maxiov)
{
    uint16_t at = q->resubmit[k];
    if (!q->packed)
        return vd_ring_map_split(q, at, c, iov, maxiov);
    struct vring_packed_desc d[VD_MAX_CHAIN];
    /* Checked by recover_packed, but the region is the front-end's memory: again. */
    uint16_t n = rd16_at(pk_entry(q, at), PE_NUM), e = at;
    if (n == 0 || n > q->chain_limit) {
        vd_queue_fail(q, "queue %d: inflight entry %u changed under us", q->index, at);
        return -1;
    }
    for (uint16_t i = 0; i < n; i++) {
        if (e >= q->num) {
            vd_queue_fail(q, "queue %d: inflight entry %u changed under us", q->index, at);
            return -1;
        }
        const uint8_t *ent = pk_entry(q, e);
        d[i].id = rd16_at(ent, PE_ID);
        d[i].flags = rd16_at(ent, PE_FLAGS);
        memcpy(&d[i].len, ent + PE_LEN, 4);
        memcpy(&d[i].addr, ent + PE_ADDR, 8);
        e = rd16_at(ent, PE_NEXT);
    }
    c->id = d[n - 1].id;
    c->ndesc = n;
    c->pos = at;
    return vd_ring_map_packed(q, d, n, c, iov, maxiov);
}
