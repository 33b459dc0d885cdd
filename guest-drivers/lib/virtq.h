/* Virtqueue, driver side, polled: split (virtio 1.2 section 2.7) and packed
 * (section 2.8) layouts behind one interface.
 *
 * Built into the guest programs (freestanding, rt.h) and, with VIRTQ_LIBC,
 * into vhostd's load generator (see virtq_port.h).  The rings live in memory
 * the caller provides together with its guest-physical address, since the
 * device sees addresses that need not be the driver's pointers.
 *
 * The driver keeps its own copy of everything it relies on (free lists,
 * chain lengths, buffer ids in flight, writable bytes per chain), so that
 * nothing the device writes can corrupt it; whatever the device hands back
 * (used index or used descriptor, id, length) is checked before it is
 * trusted, and the first impossible value marks the queue broken.
 */
#ifndef GUEST_VIRTQ_H
#define GUEST_VIRTQ_H

#include "virtq_port.h"

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
/* split */
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1
/* packed (2.8.1, 2.8.10) */
#define VRING_PACKED_DESC_F_AVAIL (1 << 7)
#define VRING_PACKED_DESC_F_USED (1 << 15)
#define VRING_EVENT_F_ENABLE 0
#define VRING_EVENT_F_DISABLE 1
#define VRING_EVENT_F_DESC 2 /* only with VIRTIO_F_EVENT_IDX */
#define VRING_PACKED_EVENT_WRAP (1 << 15)

/* ---- split layout (2.7) ---- */
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

/* ---- packed layout (2.8.13, 2.8.10.1) ---- */
struct vring_packed_desc {
    u64 addr;
    u32 len;
    u16 id;
    u16 flags;
};

/* The driver area (driver writes: used-buffer notifications it wants) and
 * the device area (device writes: available-buffer notifications it wants). */
struct vring_packed_event {
    u16 off_wrap; /* bits 0-14 descriptor offset, bit 15 its wrap counter */
    u16 flags;    /* VRING_EVENT_F_* */
};

_Static_assert(sizeof(struct vring_desc) == 16, "vring_desc layout");
_Static_assert(sizeof(struct vring_used_elem) == 8, "vring_used_elem layout");
_Static_assert(sizeof(struct vring_packed_desc) == 16, "vring_packed_desc layout");
_Static_assert(sizeof(struct vring_packed_event) == 4, "vring_packed_event layout");

/* One buffer of a chain: guest-physical address and length. */
struct vq_buf {
    u64 addr;
    u32 len;
};

/* virtq_init flags */
#define VIRTQ_F_PACKED 1    /* VIRTIO_F_RING_PACKED negotiated */
#define VIRTQ_F_EVENT_IDX 2 /* VIRTIO_F_EVENT_IDX negotiated */

/* Bytes and alignment of what a queue needs (virtq_sizes). */
struct virtq_sizes {
    u64 desc, desc_align;         /* split: descriptor table; packed: descriptor ring */
    u64 driver, driver_align;     /* split: avail ring; packed: driver event area */
    u64 device, device_align;     /* split: used ring; packed: device event area */
    u64 indirect, indirect_align; /* indirect tables (0 without) */
    u64 state, state_align;       /* the driver's private state */
};

/* The memory of one queue.  The rings and indirect tables are shared with
 * the device: each has the pointer the driver uses and the address the
 * device knows it by.  state is private.  Everything zeroed. */
struct virtq_mem {
    void *desc;
    u64 desc_gpa;
    void *driver;
    u64 driver_gpa;
    void *device;
    u64 device_gpa;
    void *indirect;
    u64 indirect_gpa;
    void *state;
};

struct vdev;

struct virtq {
    u16 index;        /* queue number on the device */
    u16 size;         /* entries (split: a power of two) */
    int packed;       /* layout */
    int event_idx;    /* VIRTIO_F_EVENT_IDX negotiated */
    u16 indirect_max; /* >0: chains of 2..indirect_max buffers go indirect */
    struct vdev *dev; /* guest transport (vdev_queue_setup); unused by this file */

    /* device-visible memory and the addresses the device knows it by */
    u64 desc_gpa, driver_gpa, device_gpa;
    struct vring_desc *desc;           /* split */
    struct vring_avail *avail;         /* split */
    struct vring_used *used;           /* split */
    struct vring_packed_desc *pdesc;   /* packed */
    struct vring_packed_event *driver_event; /* packed: ours */
    struct vring_packed_event *device_event; /* packed: the device's */
    u8 *ind;                           /* indirect tables, indirect_max entries per id */
    u64 ind_gpa;

    /* split: free descriptors are a list through links[]; a chain's id is
     * its head descriptor.  packed: descriptors are taken in ring order,
     * free buffer ids are a list through links[]. */
    u16 free_head, num_free; /* num_free: ring descriptors */
    u16 next_avail;          /* split: next avail index; packed: next ring position */
    u16 avail_wrap;          /* packed: driver ring wrap counter at next_avail */
    u16 pub_pos;             /* packed: first position not yet published */
    u16 last_used;           /* split: next used index; packed: next used position */
    u16 used_wrap;           /* packed: wrap counter expected at last_used */
    u16 kick_old;            /* split: avail index at the last notify decision */
    u32 kick_added;          /* packed: descriptors published since that decision */
    u16 inflight;            /* chains added and not yet used */
    u32 add_seq, pub_seq;    /* chains added / published so far */
    int intr;                /* used-buffer notifications asked for (virtq_enable_intr) */
    u16 used_event;          /* split, EVENT_IDX: what we last wrote there */

    /* per id (size entries each), in state memory */
    u16 *links;
    u16 *ndesc;   /* ring descriptors of the chain */
    u8 *busy;     /* in flight */
    u32 *seq;     /* add_seq when added: published iff before pub_seq */
    u32 *in_len;  /* device-writable bytes of the chain */
    void **cookie;
    u32 *pend;    /* packed, per position: head flags | descriptors << 16 until published */

    int broken;       /* the device returned something impossible */
    char error[128];  /* what, for messages */
    u64 stat_adds, stat_kicks, stat_kicks_skipped, stat_completions;
    u64 stat_len_ignored; /* used lengths of chains with nothing writable (reported as 0) */
};

/* What a queue of `size` entries needs (size: split a power of two,
 * packed 1..32768). */
void virtq_sizes(u16 size, int packed, u16 indirect_max, struct virtq_sizes *s);
/* Set up a queue on zeroed memory laid out as virtq_sizes says (flags:
 * VIRTQ_F_*; indirect_max 0 = no indirect descriptors).  Used-buffer
 * notifications start disabled.  Returns 0, or -1 for an impossible size or
 * misaligned memory (q->error says which). */
int virtq_init(struct virtq *q, u16 index, u16 size, unsigned flags, u16 indirect_max, const struct virtq_mem *m);

/* Add a chain: n_out device-readable buffers then n_in device-writable
 * ones.  Returns its id (>= 0, split: the head descriptor, packed: the
 * buffer id), or -1 if the ring has no room (or the chain is empty, or the
 * queue broke).  Not visible to the device until virtq_publish/kick. */
int virtq_add(struct virtq *q, const struct vq_buf *bufs, int n_out, int n_in, void *cookie);
/* Make the added chains visible (split: avail->idx; packed: the head
 * descriptors' flags, after everything else). */
void virtq_publish(struct virtq *q);
/* Publish; returns 1 if the device wants a notification for what was
 * published since the last decision (NO_NOTIFY / avail_event, or the
 * device event area), 0 if not.  The caller notifies. */
int virtq_kick_prepare(struct virtq *q);
/* Descriptors a chain of n buffers needs (1 when it goes indirect). */
int virtq_descs_needed(const struct virtq *q, int n);
static inline int virtq_has_room(const struct virtq *q, int n) { return q->num_free >= virtq_descs_needed(q, n); }
/* One completion: returns 1 and fills cookie/len, 0 if none, -1 if the
 * device returned an impossible entry (the queue is then broken): an id out
 * of range, not in flight or never published, a length beyond the chain's
 * writable bytes (a chain without any gets len 0 whatever the device said),
 * a split used index beyond what is in flight. */
int virtq_poll(struct virtq *q, void **cookie, u32 *len);
/* A used entry is waiting (without taking it). */
int virtq_has_used(const struct virtq *q);
/* Used-buffer notifications: enable asks for one at the next used entry
 * (with EVENT_IDX: only that one; ask again after reaping) and returns 1 if
 * one is already waiting; disable asks for none (best effort). */
int virtq_enable_intr(struct virtq *q);
void virtq_disable_intr(struct virtq *q);
/* For messages: split the device's used index; packed the next used
 * position with its wrap counter in bit 15. */
u16 virtq_used_idx(const struct virtq *q);

static inline int vring_need_event(u16 event, u16 new_idx, u16 old)
{
    return (u16)(new_idx - event - 1) < (u16)(new_idx - old);
}

#ifndef VIRTQ_LIBC
/* Guest programs: allocate zeroed memory from the runtime and set up (a
 * split ring's size is rounded down to a power of two); panics if that
 * fails. */
void virtq_alloc(struct virtq *q, u16 index, u16 size, unsigned flags, u16 indirect_max);
/* virtq_kick_prepare, then QueueNotify when it says so.  Returns 1 if a
 * notification was sent. */
int virtq_kick(struct virtq *q);
#endif

#endif
