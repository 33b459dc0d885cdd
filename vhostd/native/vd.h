/* vhostd native data plane: shared declarations.
 *
 * Layers (each in its own file):
 *   memory.c  guest memory table: map regions, translate addresses with bounds checks
 *   vring.c   split virtqueue: walk descriptor chains into requests, fill the used ring, notify
 *   engine.c  worker threads (epoll on kick eventfds), queue lifecycle, error reporting
 *   blk.c     virtio-blk request handling; sees vd_req only, never rings or vhost-user
 *
 * Everything the guest or the front-end wrote is treated as hostile: indices, lengths
 * and addresses are checked before use, and guest memory is only read with memcpy
 * (no alignment assumptions) from inside a SIGBUS guard.
 */
#ifndef VHOSTD_VD_H
#define VHOSTD_VD_H

#include <pthread.h>
#include <stdint.h>
#include <sys/uio.h>

#include "api.h"

#define VD_MAX_QUEUE_SIZE 1024
#define VD_MAX_CHAIN 1024          /* hard cap on descriptors in one request */
#define VD_MAX_IOV (VD_MAX_CHAIN + 64)
#define VD_MAX_REGIONS 509
#define VD_MAX_QUEUES 64
#define VD_ERRMSG 256
#define VD_USED_BATCH 64           /* make used entries visible at least this often (one signal per batch) */
#define VD_BUDGET 64               /* requests per turn before the worker serves its other queues */
#define VD_SPIN_SLICE_NS 20000     /* with queues to look at again: this long between epoll_waits */

/* ---------------------------------------------------------------- memory */

struct vd_region {
    uint64_t gpa, size, uva;
    uint8_t *host;      /* host address of gpa */
    void *map;          /* what mmap returned (page aligned) */
    size_t map_len;
};

struct vd_mem {
    uint32_t n, cap;
    struct vd_region *r; /* sorted by gpa, non-overlapping */
};

int vd_mem_add(struct vd_mem *m, const struct vd_region_desc *d, int fd, char *err, size_t errlen);
int vd_mem_remove(struct vd_mem *m, const struct vd_region_desc *d, char *err, size_t errlen);
void vd_mem_clear(struct vd_mem *m);
/* Host pointer for [gpa, gpa+len) if it lies inside one region, else NULL. */
void *vd_mem_gpa(const struct vd_mem *m, uint64_t gpa, uint64_t len);
/* Same for a front-end user address (vring addresses are UVAs). */
void *vd_mem_uva(const struct vd_mem *m, uint64_t uva, uint64_t len);
/* Split [gpa, gpa+len) into host iovecs (it may cross adjacent regions).
 * Returns the number of iovecs used, -1 if part of it is unmapped, or -2 if
 * it needs more than `max` iovecs. */
int vd_mem_map(const struct vd_mem *m, uint64_t gpa, uint64_t len, struct iovec *iov, int max);
/* Whether a host address lies inside one of the table's mappings. */
int vd_mem_owns(const struct vd_mem *m, const void *host);

/* ---------------------------------------------------------------- requests */

/* One descriptor chain, as a device sees it: device-readable bytes first
 * ("out", written by the driver), then device-writable bytes ("in"). */
struct vd_req {
    uint16_t head;
    int nout, nin;          /* iov[0..nout) readable, iov[nout..nout+nin) writable */
    uint64_t out_bytes, in_bytes;
    struct iovec *iov;
};

/* Device request handler: returns the number of bytes written into the
 * writable part (the used length).  Never fails: bad requests are answered
 * with an error status inside the request. */
typedef uint32_t (*vd_handle_fn)(void *ctx, struct vd_req *req, int queue);

/* ---------------------------------------------------------------- queues */

struct vring_desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_USED_F_NO_NOTIFY 1
#define VRING_AVAIL_F_NO_INTERRUPT 1

#define VIRTIO_RING_F_INDIRECT_DESC 28
#define VIRTIO_RING_F_EVENT_IDX 29

struct vd_queue_stats {
    uint64_t requests, kicks, notifies, out_bytes, in_bytes, chain_errors;
    /* request latency (taken to completed), only while dev->timing is set:
     * lat[k] counts requests under 2^k us, the last bucket everything slower */
    uint64_t lat[VD_LAT_BUCKETS], lat_sum_ns;
};

struct vd_device;
struct vd_worker;

struct vd_queue {
    pthread_mutex_t lock;
    struct vd_device *dev;
    struct vd_worker *worker;
    int index;
    /* set by the control plane */
    uint32_t num;
    uint64_t desc_uva, avail_uva, used_uva;
    int addr_set;
    int kick_fd, call_fd, err_fd;
    int started;            /* kick fd (or polling) set and rings translated */
    int polled;             /* started without a kick fd: the worker polls it */
    int rx;                 /* device-driven (net rx): kicks call dev->rx_kick, not handle */
    int enabled;
    int event_idx, indirect;
    uint32_t chain_limit;
    /* ring state, owned by the worker while started */
    uint8_t *desc, *avail, *used; /* host pointers */
    uint16_t last_avail, used_idx, signalled_used;
    int signalled_valid;
    int broken;
    int fresh;              /* used_idx must be read from the ring before first use */
    char errmsg[VD_ERRMSG];
    int error_pending;      /* errmsg not yet collected by the control plane */
    struct vd_queue_stats st;
    /* VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: this queue's region of the
     * front-end's inflight memfd (NULL = untracked).  Every request taken is
     * marked there until its completion is visible, so a restarted back-end
     * can redo what a crash left unfinished. */
    uint8_t *inflight;
    int inflight_recover;   /* look at the region before serving (set at start) */
    uint64_t inflight_counter;
    uint16_t resubmit[VD_MAX_QUEUE_SIZE]; /* heads to redo first, oldest first */
    int nresubmit, resubmit_pos;
    struct iovec iov[VD_MAX_IOV];
    struct vd_queue *poll_next;
    /* the worker's again list (engine.c), touched only by the owning worker */
    int again;              /* on it: notifications left disabled */
    uint64_t spin_until;    /* end of the poll window (CLOCK_MONOTONIC ns): then ask for kicks */
    struct vd_queue *again_next;
};

struct vd_device {
    struct vd_engine *engine;
    int nqueues;
    uint32_t max_queue_size;
    uint64_t features;
    struct vd_mem mem;
    vd_handle_fn handle;
    void (*rx_kick)(void *ctx, int queue); /* device-driven queues: the driver added buffers */
    void *ctx;
    int event_fd;           /* written when a queue breaks; the control plane reads errors */
    uint64_t poll_ns;       /* busy-poll window of a queue that ran empty; 0 = off */
    int needs_reset;
    int timing;             /* measure request latency (metrics on): two clock reads per request */
    struct vd_queue q[];
};

/* queue processing (vring.c); called by a worker with q->lock held.  Returns
 * VD_MORE when it stopped after VD_BUDGET requests with more waiting (the
 * caller must come back: notifications are left disabled), VD_IDLE when the
 * ring ran empty and notifications are enabled again, or, with `quiet`,
 * VD_QUIET when the ring ran empty and notifications were left disabled (the
 * caller polls the ring, and re-enables them with vd_queue_want_kick). */
enum { VD_IDLE = 0, VD_MORE = 1, VD_QUIET = 2 };
int vd_queue_process(struct vd_queue *q, int quiet);

/* Device-driven use (net rx), q->lock held: pop returns 1 with req mapped
 * into iov, 0 when the ring is empty, -1 when the queue broke. */
int vd_queue_ready(struct vd_queue *q);
int vd_queue_pop(struct vd_queue *q, struct vd_req *req, struct iovec *iov, int maxiov);
void vd_queue_unpop(struct vd_queue *q, int n);
int vd_queue_has_avail(struct vd_queue *q);

void vd_block_signals(void); /* engine.c: for every native thread */
/* engine.c: run fn(arg) so that a SIGBUS on guest memory breaks q, not the daemon */
int vd_run_guarded(struct vd_queue *q, int (*fn)(void *), void *arg);
/* engine.c: run fn(arg); a SIGBUS inside returns VD_FAULTED with the address in *addr */
#define VD_FAULTED (-1000)
int vd_try_guarded(int (*fn)(void *), void *arg, void **addr);
void vd_queue_push(struct vd_queue *q, uint16_t head, uint32_t len);
void vd_queue_flush(struct vd_queue *q);
int vd_queue_want_kick(struct vd_queue *q);
void vd_queue_fail(struct vd_queue *q, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int vd_queue_translate(struct vd_queue *q, char *err, size_t errlen);

#endif
