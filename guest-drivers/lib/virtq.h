/* Split virtqueue, driver side (virtio 1.2 section 2.7), polled.
 *
 * The driver keeps its own copy of the descriptor links (free list and
 * chains) so that nothing the device writes can corrupt them; what the
 * device hands back in the used ring is checked before it is trusted.
 */
#ifndef GUEST_VIRTQ_H
#define GUEST_VIRTQ_H

#include "rt.h"

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

struct vring_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct vring_avail {
    u16 flags;
    u16 idx;
    u16 ring[]; /* size entries, then used_event */
};

struct vring_used_elem {
    u32 id;
    u32 len;
};

struct vring_used {
    u16 flags;
    u16 idx;
    struct vring_used_elem ring[]; /* size entries, then avail_event */
};

_Static_assert(sizeof(struct vring_desc) == 16, "vring_desc layout");
_Static_assert(sizeof(struct vring_used_elem) == 8, "vring_used_elem layout");

/* One buffer of a chain: guest-physical address and length. */
struct vq_buf {
    u64 addr;
    u32 len;
};

struct vdev;

struct virtq {
    u16 index; /* queue number on the device */
    u16 size;  /* power of two */
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    struct vdev *dev; /* set by vdev_queue_setup */

    int event_idx;    /* VIRTIO_F_EVENT_IDX negotiated */
    u16 indirect_max; /* >0: chains of 2..indirect_max buffers go indirect */

    u16 free_head, num_free;
    u16 avail_shadow;    /* next avail index (published by virtq_publish) */
    u16 kick_old;        /* avail index at the last notify decision */
    u16 last_used;       /* next used entry to consume */
    u16 inflight;        /* chains added and not yet completed */
    u16 *links;          /* private next links: free list and chains */
    u16 *chain_len;      /* ring descriptors used by the chain of this head */
    u8 *busy;            /* head is in flight */
    void **cookie;       /* per head */
    struct vring_desc *ind; /* indirect tables, indirect_max entries per head */

    int broken;          /* the device returned something impossible */
    u64 stat_adds, stat_kicks, stat_kicks_skipped, stat_completions;
};

/* Allocate and zero the rings and driver state of a queue of `size` entries
 * (rounded down to a power of two).  event_idx/indirect_max describe what
 * was negotiated (indirect_max 0 = no indirect descriptors). */
void virtq_alloc(struct virtq *q, u16 index, u16 size, int event_idx, u16 indirect_max);

/* Add a chain: n_out device-readable buffers then n_in device-writable
 * ones.  Returns the head (>= 0), or -1 if the ring has no room (or the
 * chain is empty).  Not visible to the device until virtq_publish/kick. */
int virtq_add(struct virtq *q, const struct vq_buf *bufs, int n_out, int n_in, void *cookie);
/* Make the added chains visible (write barrier, then avail->idx). */
void virtq_publish(struct virtq *q);
/* Publish and notify the device if it asked for it (EVENT_IDX avail_event,
 * or the NO_NOTIFY flag).  Returns 1 if a notification was sent. */
int virtq_kick(struct virtq *q);
/* Descriptors a chain of n buffers needs (1 when it goes indirect). */
int virtq_descs_needed(const struct virtq *q, int n);
static inline int virtq_has_room(const struct virtq *q, int n) { return q->num_free >= virtq_descs_needed(q, n); }
/* One completion: returns 1 and fills cookie/len, 0 if none, -1 if the
 * device returned an impossible entry (the queue is then marked broken). */
int virtq_poll(struct virtq *q, void **cookie, u32 *len);
/* used->idx as last read (for diagnostics) */
u16 virtq_used_idx(const struct virtq *q);

static inline int vring_need_event(u16 event, u16 new_idx, u16 old)
{
    return (u16)(new_idx - event - 1) < (u16)(new_idx - old);
}

#endif
