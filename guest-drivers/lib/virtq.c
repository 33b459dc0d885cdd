/* Split virtqueue, driver side (virtio 1.2 section 2.7). */
#include "virtq.h"
#include "virtio_mmio.h"

static u16 *used_event_slot(struct virtq *q)
{
    return &q->avail->ring[q->size];
}

static u16 *avail_event_slot(struct virtq *q)
{
    return (u16 *)&q->used->ring[q->size];
}

void virtq_alloc(struct virtq *q, u16 index, u16 size, int event_idx, u16 indirect_max)
{
    u16 n = 1;
    while ((u32)n * 2 <= size && n < 32768)
        n *= 2;
    memset(q, 0, sizeof(*q));
    q->index = index;
    q->size = n;
    q->event_idx = event_idx;
    q->indirect_max = indirect_max;

    /* desc (16-byte aligned), avail (2), used (4): one zeroed block, the used
     * ring on its own page as in the legacy layout (not required, tidy). */
    u64 desc_sz = 16ull * n, avail_sz = 6 + 2ull * n, used_off = ALIGN_UP(desc_sz + avail_sz, 4096);
    u8 *mem = zalloc(used_off + 6 + 8ull * n, 4096);
    q->desc = (struct vring_desc *)mem;
    q->avail = (struct vring_avail *)(mem + desc_sz);
    q->used = (struct vring_used *)(mem + used_off);

    q->links = alloc(2ull * n, 8);
    q->chain_len = zalloc(2ull * n, 8);
    q->busy = zalloc(n, 8);
    q->cookie = zalloc(8ull * n, 8);
    if (indirect_max)
        q->ind = zalloc(16ull * n * indirect_max, 16);
    for (u16 i = 0; i < n; i++)
        q->links[i] = (u16)(i + 1); /* the last link (n) is never followed */
    q->free_head = 0;
    q->num_free = n;

    /* Polling drivers want no interrupts: the flag without EVENT_IDX, and
     * with it a used_event kept half a ring-index space ahead (virtq_poll). */
    if (event_idx)
        *used_event_slot(q) = 0x8000;
    else
        q->avail->flags = VRING_AVAIL_F_NO_INTERRUPT;
}

int virtq_descs_needed(const struct virtq *q, int n)
{
    return (q->indirect_max && n > 1 && n <= q->indirect_max) ? 1 : n;
}

int virtq_add(struct virtq *q, const struct vq_buf *bufs, int n_out, int n_in, void *cookie)
{
    int n = n_out + n_in;
    if (n <= 0 || q->broken)
        return -1;
    int need = virtq_descs_needed(q, n);
    if (need > q->num_free)
        return -1;

    u16 head = q->free_head;
    if (need == 1 && n > 1) {
        struct vring_desc *t = q->ind + (u64)head * q->indirect_max;
        for (int i = 0; i < n; i++) {
            t[i].addr = bufs[i].addr;
            t[i].len = bufs[i].len;
            t[i].flags = (u16)((i >= n_out ? VRING_DESC_F_WRITE : 0) | (i + 1 < n ? VRING_DESC_F_NEXT : 0));
            t[i].next = (u16)(i + 1 < n ? i + 1 : 0);
        }
        q->desc[head].addr = gpa(t);
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
    q->num_free = (u16)(q->num_free - need);
    q->chain_len[head] = (u16)need;
    q->cookie[head] = cookie;
    q->busy[head] = 1;
    q->inflight++;
    q->avail->ring[q->avail_shadow & (q->size - 1)] = head;
    q->avail_shadow++;
    q->stat_adds++;
    return head;
}

void virtq_publish(struct virtq *q)
{
    wmb(); /* descriptors and ring entries before the index */
    WRITE_ONCE(q->avail->idx, q->avail_shadow);
}

int virtq_kick(struct virtq *q)
{
    u16 old = q->kick_old, now = q->avail_shadow;
    virtq_publish(q);
    if (old == now)
        return 0;
    q->kick_old = now;
    mb(); /* the index store before reading the device's suppression state */
    int need;
    if (q->event_idx)
        need = vring_need_event(READ_ONCE(*avail_event_slot(q)), now, old);
    else
        need = !(READ_ONCE(q->used->flags) & VRING_USED_F_NO_NOTIFY);
    if (need) {
        vdev_notify(q->dev, q->index);
        q->stat_kicks++;
    } else {
        q->stat_kicks_skipped++;
    }
    return need;
}

u16 virtq_used_idx(const struct virtq *q)
{
    return READ_ONCE(q->used->idx);
}

int virtq_poll(struct virtq *q, void **cookie, u32 *len)
{
    if (q->broken)
        return -1;
    u16 used_idx = READ_ONCE(q->used->idx);
    if (used_idx == q->last_used)
        return 0;
    if ((u16)(used_idx - q->last_used) > q->inflight) {
        printf("virtq %u: used idx %u is %u ahead of %u with only %u in flight\n", q->index, used_idx,
               (u16)(used_idx - q->last_used), q->last_used, q->inflight);
        q->broken = 1;
        return -1;
    }
    rmb(); /* the index before the entry */
    struct vring_used_elem e = q->used->ring[q->last_used & (q->size - 1)];
    if (e.id >= q->size || !q->busy[e.id]) {
        printf("virtq %u: used entry %u names descriptor %u which is not in flight\n", q->index, q->last_used, e.id);
        q->broken = 1;
        return -1;
    }
    u16 head = (u16)e.id, tail = head;
    for (u16 i = 1; i < q->chain_len[head]; i++)
        tail = q->links[tail];
    q->links[tail] = q->free_head;
    q->free_head = head;
    q->num_free = (u16)(q->num_free + q->chain_len[head]);
    q->busy[head] = 0;
    q->inflight--;
    q->last_used++;
    q->stat_completions++;
    if (q->event_idx)
        WRITE_ONCE(*used_event_slot(q), (u16)(q->last_used + 0x8000));
    if (cookie)
        *cookie = q->cookie[head];
    if (len)
        *len = e.len;
    q->cookie[head] = 0;
    return 1;
}
