/* virtio-blk driver (virtio 1.2 section 5.2), polled, several requests in
 * flight per queue, several queues with VIRTIO_BLK_F_MQ. */
#ifndef GUEST_VIRTIO_BLK_H
#define GUEST_VIRTIO_BLK_H

#include "virtio_mmio.h"
#include "virtq.h"

#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_GEOMETRY 4
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_TOPOLOGY 10
#define VIRTIO_BLK_F_MQ 12
#define VIRTIO_BLK_F_DISCARD 13
#define VIRTIO_BLK_F_WRITE_ZEROES 14

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13

#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define VBLK_S_PENDING 0xff /* written by the driver before submitting */

#define VIRTIO_BLK_ID_BYTES 20
#define SECTOR_SIZE 512
#define VBLK_MAX_QUEUES 8
#define VBLK_MAX_DATA_SEGS 32

/* A request; the header and status byte live in it, so it must be in guest
 * RAM the device can reach (allocate with vblk_req_alloc). */
struct vblk_req {
    struct {
        u32 type;
        u32 reserved;
        u64 sector;
    } hdr;           /* device-readable */
    u8 status;       /* device-writable */
    u8 pad[7];
    void *buf;       /* data: written by the device for IN and GET_ID */
    u32 len;
    u32 used_len;    /* what the device reported */
    u16 queue;
    u16 in_flight;
    u32 tag;         /* free for the caller */
    u64 t_submit;    /* rdtsc at submit */
    u64 user;        /* free for the caller */
};

struct vblk_opts {
    u32 queues;     /* queues wanted (1..VBLK_MAX_QUEUES); more than 1 needs F_MQ */
    u32 queue_size; /* 0: the largest the device allows, capped at 1024 */
    int event_idx;  /* negotiate VIRTIO_F_EVENT_IDX if offered */
    int indirect;   /* negotiate VIRTIO_F_INDIRECT_DESC if offered */
    int packed;     /* negotiate VIRTIO_F_RING_PACKED if offered (0: split rings) */
};

struct vblk {
    struct vdev dev;
    u32 nq;
    struct virtq q[VBLK_MAX_QUEUES];
    u64 capacity; /* 512-byte sectors */
    u32 size_max; /* 0: no limit */
    u32 seg_max;  /* 0: no limit */
    u32 blk_size;
    u16 num_queues; /* from config space (1 without F_MQ) */
    int ro, can_flush, can_write_zeroes, can_discard;
    u64 timeout_cycles; /* for the synchronous helpers */
};

void vblk_default_opts(struct vblk_opts *o);
/* Probe, negotiate, set up queues, DRIVER_OK.  Returns 0 or -1. */
int vblk_init(struct vblk *b, u64 mmio_base, const char *name, const struct vblk_opts *o);
struct vblk_req *vblk_req_alloc(void);
/* Queue a request of `type` at `sector` with data [buf, buf+len) (len 0 for
 * FLUSH).  Not kicked.  Returns 0, -1 if the queue has no room, -2 if the
 * request cannot be expressed (too many segments) or the queue broke. */
int vblk_submit(struct vblk *b, u32 qi, struct vblk_req *r, u32 type, u64 sector, void *buf, u32 len);
int vblk_kick(struct vblk *b, u32 qi);
/* One completed request of queue qi or NULL (sets *err on a broken queue). */
struct vblk_req *vblk_poll(struct vblk *b, u32 qi, int *err);
/* Descriptors one request of len bytes needs, and room for one more. */
int vblk_room(struct vblk *b, u32 qi, u32 len);
/* Synchronous request on queue 0: returns the status byte, or -1 if it did
 * not complete within timeout_cycles or the queue broke. */
int vblk_do(struct vblk *b, u32 type, u64 sector, void *buf, u32 len);
/* GET_ID into a 21-byte buffer (NUL-terminated).  Returns the status. */
int vblk_get_id(struct vblk *b, char out[VIRTIO_BLK_ID_BYTES + 1]);

#endif
