/* vhost-user-blk load generator: the driver side of the virtqueues, split
 * or packed, through guest-drivers/lib/virtq.c (the guest programs' queue).
 * build.py hands this file (minus preprocessor lines) to cffi's cdef. */
#ifndef VHOSTD_LG_H
#define VHOSTD_LG_H
#include <stdint.h>

/* One virtqueue the Python side laid out in the shared memory and handed
 * to the back-end: host pointers for us, *_gpa what the back-end knows them
 * by.  Split: descriptor table, avail ring, used ring; packed: descriptor
 * ring, driver event area, device event area (4 bytes each). */
struct lg_queue {
    uint8_t *desc, *avail, *used;
    uint64_t desc_gpa, avail_gpa, used_gpa;
    uint16_t num;
    int kick_fd, call_fd;
    uint8_t *slots;          /* iodepth * 32 bytes: 16-byte header + status byte */
    uint64_t slots_gpa;
    uint8_t *data;           /* iodepth * bs bytes of data buffers */
    uint64_t data_gpa;
};

struct lg_params {
    int write;               /* 0 read, 1 write */
    int random;              /* 0 sequential, 1 uniform random offsets */
    uint32_t bs;             /* bytes per request, a multiple of 512 */
    uint32_t iodepth;        /* requests in flight per queue */
    uint64_t capacity;       /* disk size in bytes */
    double seconds;
    int poll;                /* spin on the used ring instead of sleeping on the call fd */
    int event_idx;           /* VIRTIO_RING_F_EVENT_IDX negotiated */
    int packed;              /* VIRTIO_F_RING_PACKED negotiated */
    uint64_t seed;
};

struct lg_result {
    uint64_t ios, errors, bytes, kicks, waits;
    double elapsed;          /* seconds from first submit to the deadline */
    double p50_us, p99_us, max_us;
    int drained;             /* every request came back before we stopped waiting */
    char error[160];         /* why lg_run returned -EPROTO: what the back-end did to a ring */
};

/* 0; -EINVAL/-ENOMEM; -EPROTO when the back-end returned something
 * impossible on a ring (out->error says what; the run stops there). */
int lg_run(const struct lg_params *p, struct lg_queue *qs, int nqueues, struct lg_result *out);

/* The pattern writes carry: every 512-byte sector starts with this magic and
 * its own byte offset on the disk, so a test can check what landed where. */
uint64_t lg_magic(void);
#endif
