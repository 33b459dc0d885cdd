/* vhost-user-blk load generator: the driver side of split virtqueues.
 * build.py hands this file (minus preprocessor lines) to cffi's cdef. */
#ifndef VHOSTD_LG_H
#define VHOSTD_LG_H
#include <stdint.h>

/* One virtqueue the Python side laid out in the shared memory and handed
 * to the back-end.  Host pointers for us; gpa_* for the descriptors. */
struct lg_queue {
    uint8_t *desc, *avail, *used;
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
    uint64_t seed;
};

struct lg_result {
    uint64_t ios, errors, bytes, kicks, waits;
    double elapsed;          /* seconds from first submit to the deadline */
    double p50_us, p99_us, max_us;
    int drained;             /* every request came back before we stopped waiting */
};

int lg_run(const struct lg_params *p, struct lg_queue *qs, int nqueues, struct lg_result *out);

/* The pattern writes carry: every 512-byte sector starts with this magic and
 * its own byte offset on the disk, so a test can check what landed where. */
uint64_t lg_magic(void);
#endif
