/* vhostd native data plane: shared declarations.
 *
 * Layers (each in its own file):
 *   memory.c   guest memory table: map regions, translate addresses with bounds checks
 *   log.c      the dirty-page log of a live migration: what we wrote into guest memory
 *   vring.c    virtqueues, split and packed layouts: walk descriptor chains, find what
 *              the driver made available, write used entries, notify
 *   inflight.c the front-end's inflight area: what was taken and not completed
 *   request.c  requests: taken from the ring into a pool, handed to the device,
 *              completed now or later (out of order), released
 *   aio.c      I/O engines (io_uring per worker, a thread pool); knows no rings
 *   engine.c   worker threads (epoll on kick eventfds and I/O completions), queue
 *              lifecycle, error reporting
 *   blk.c      virtio-blk request handling; sees vd_req only, never rings or vhost-user
 *   net.c      virtio-net device logic; its ports: net_switch.c (the L2 switch),
 *              net_tap.c (TAP queues, served as event sources of the workers)
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
#include <time.h>

#include "aio.h"
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
#define VD_POOL_THREADS 64         /* at most this many threads in the I/O thread pool */
#define VD_BUSY_ROUND 32           /* requests finished in a worker round that make it a busy one */

/* ---------------------------------------------------------------- memory (memory.c) */

struct vd_mapping;

struct vd_region {
    uint64_t gpa, size, uva;
    uint8_t *host;      /* host address of gpa */
    struct vd_mapping *m;
};

/* An immutable snapshot of the memory table; a change builds a new one.
 * refs: one for the device while it is current, plus the pending requests
 * mapped against it (they keep its mappings alive, see request.c). */
struct vd_mem {
    int refs;
    uint32_t n;
    struct vd_region r[]; /* sorted by gpa, non-overlapping */
};

int vd_mem_build(struct vd_mem **out, int n, const struct vd_region_desc *d, const int *fds, char *err,
                 size_t errlen);
int vd_mem_with(struct vd_mem **out, const struct vd_mem *old, const struct vd_region_desc *d, int fd, char *err,
                size_t errlen);
int vd_mem_without(struct vd_mem **out, const struct vd_mem *old, const struct vd_region_desc *d, char *err,
                   size_t errlen);
void vd_mem_get(struct vd_mem *m, int n);
void vd_mem_put(struct vd_mem *m);
/* Host pointer for [gpa, gpa+len) if it lies inside one region, else NULL.  m may be NULL (no table). */
void *vd_mem_gpa(const struct vd_mem *m, uint64_t gpa, uint64_t len);
/* Same for a front-end user address (vring addresses are UVAs). */
void *vd_mem_uva(const struct vd_mem *m, uint64_t uva, uint64_t len);
/* Split [gpa, gpa+len) into host iovecs (it may cross adjacent regions).
 * Returns the number of iovecs used, -1 if part of it is unmapped, or -2 if
 * it needs more than `max` iovecs. */
int vd_mem_map(const struct vd_mem *m, uint64_t gpa, uint64_t len, struct iovec *iov, int max);
/* Whether a host address lies inside one of the table's mappings. */
int vd_mem_owns(const struct vd_mem *m, const void *host);
/* The guest-physical address of a host address inside one region: 0 and
 * *gpa set, or -1 when it is in none. */
int vd_mem_host_gpa(const struct vd_mem *m, const void *host, uint64_t *gpa);
/* End of the highest region: the guest-physical span a dirty log must cover. */
uint64_t vd_mem_end(const struct vd_mem *m);

/* ---------------------------------------------------------------- dirty log (log.c) */

#define VD_LOG_PAGE 4096ull        /* one bit of the log per page of guest-physical memory */
#define VD_LOG_USED_FLAG 1u        /* VHOST_VRING_F_LOG in SET_VRING_ADDR's flags */

struct vd_queue;
/* Mark what the device wrote into guest memory, while logging is on
 * (dev->log_on): the first len bytes of iov[0..n) (host addresses inside m),
 * or [off, off+len) of q's used ring.  A write the log does not cover fails
 * the queue (the front-end sized the log too small): never outside it. */
void vd_log_iov(struct vd_queue *q, const struct vd_mem *m, const struct iovec *iov, int n, uint64_t len);
void vd_log_used(struct vd_queue *q, uint64_t off, uint64_t len);
/* After a batch that logged: tell the front-end through the log fd, if any. */
void vd_log_kick(struct vd_queue *q);

/* ---------------------------------------------------------------- requests (request.c) */

#define VD_REQ_INLINE_IOV 8        /* chains this short need no allocation */
#define VD_REQ_BUF_LIMIT (16u << 20) /* scratch memory (bounce buffers) a queue's pending requests may hold */

struct vd_reqpool;

/* One descriptor chain, as a device sees it: device-readable bytes first
 * ("out", written by the driver), then device-writable bytes ("in").  It
 * lives in its queue's pool, in the slot of its head descriptor (packed
 * rings: its buffer id), from the moment it is taken until the device
 * completes it. */
struct vd_req {
    uint16_t head;          /* what names it in the used ring: split head descriptor, packed buffer id */
    uint16_t ndesc;         /* ring descriptors it took (packed rings move the used position by this) */
    uint16_t queue;
    int nout, nin;          /* iov[0..nout) readable, iov[nout..nout+nin) writable */
    uint64_t out_bytes, in_bytes;
    struct iovec *iov;
    uint32_t used_len;      /* set by the device: bytes written into the writable part */
    struct vd_aio *aio;     /* where the device submits I/O: the queue's worker */
    /* the queue layer's own */
    struct vd_reqpool *pool;
    struct vd_mem *mem;     /* the table iov points into, while pending */
    uint64_t t0;            /* taken (CLOCK_MONOTONIC ns), when latency is measured */
    void *buf;              /* vd_req_buf */
    size_t buf_len;
    struct iovec *big_iov;  /* for chains longer than inline_iov, kept for the slot's next use */
    int big_cap;
    int pending;
    struct iovec inline_iov[VD_REQ_INLINE_IOV];
    _Alignas(16) unsigned char priv[]; /* the device's per-request state (vd_device_new's req_priv bytes) */
};

/* What a device's handler returns. */
enum {
    VD_REQ_DONE = 0,    /* completed now; used_len is set */
    VD_REQ_PENDING = 1, /* submitted: the device calls vd_req_complete later, on this worker */
    VD_REQ_RETRY = 2,   /* out of scratch memory: take this request again after a completion */
};
typedef int (*vd_handle_fn)(void *ctx, struct vd_req *req);

static inline void *vd_req_priv(struct vd_req *req) { return req->priv; }
/* From the device's I/O completion (never inside the handler): the request
 * is finished, used_len set.  The used entry goes out with the worker's next
 * batch. */
void vd_req_complete(struct vd_req *req);
/* Whether the request's queue still runs: when not (front-end gone, queue
 * reset or broken), the device must not write guest memory any more. */
int vd_req_live(const struct vd_req *req);
/* Scratch memory for the request (e.g. an aligned bounce buffer), freed with
 * it: 0 and *out set; VD_REQ_RETRY when the queue's pending requests hold
 * VD_REQ_BUF_LIMIT already (return that from the handler: the request is
 * taken again after one of them completes); -ENOMEM (fail the request). */
int vd_req_buf(struct vd_req *req, size_t len, size_t align, void **out);

/* ---------------------------------------------------------------- queues */

struct vring_desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };
struct vring_packed_desc { uint64_t addr; uint32_t len; uint16_t id; uint16_t flags; };
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_PACKED_DESC_F_AVAIL (1u << 7)
#define VRING_PACKED_DESC_F_USED (1u << 15)
#define VRING_USED_F_NO_NOTIFY 1
#define VRING_AVAIL_F_NO_INTERRUPT 1
/* packed rings' event suppression areas: flags values */
#define VRING_EVENT_F_ENABLE 0
#define VRING_EVENT_F_DISABLE 1
#define VRING_EVENT_F_DESC 2

#define VIRTIO_RING_F_INDIRECT_DESC 28
#define VIRTIO_RING_F_EVENT_IDX 29
#define VIRTIO_F_RING_PACKED 34

/* One descriptor chain as the ring layer found it (vd_ring_peek). */
struct vd_chain {
    uint16_t id;            /* split: the head descriptor; packed: the buffer id */
    uint16_t ndesc;         /* ring descriptors it occupies (packed: how far its used entry moves) */
    uint16_t pos;           /* packed: ring position of its first descriptor */
    int nout, nin;          /* iovecs: readable first, then writable */
    uint64_t out_bytes, in_bytes;
};

/* A request takes over what the ring layer found of its chain. */
static inline void vd_req_from_chain(struct vd_req *req, const struct vd_chain *c, struct iovec *iov)
{
    req->head = c->id;
    req->ndesc = c->ndesc;
    req->nout = c->nout;
    req->nin = c->nin;
    req->out_bytes = c->out_bytes;
    req->in_bytes = c->in_bytes;
    req->iov = iov;
}

struct vd_queue_stats {
    uint64_t requests, kicks, notifies, out_bytes, in_bytes, chain_errors;
    /* request latency (taken to completed), only while dev->timing is set:
     * lat[k] counts requests under 2^k us, the last bucket everything slower */
    uint64_t lat[VD_LAT_BUCKETS], lat_sum_ns;
};

struct vd_device;
struct vd_worker;

/* Something a worker waits for in its epoll (engine.c): a queue's kick fd,
 * its wake-up and I/O completion eventfds, a store's connections.  A source
 * added with vd_source_add may also ask for a tick at a deadline. */
struct vd_source {
    void (*ready)(struct vd_source *src, uint32_t events); /* its fd is ready (epoll events) */
    void (*tick)(struct vd_source *src, uint64_t now);     /* optional: now >= deadline */
    void (*destroy)(struct vd_source *src);                /* after vd_source_remove, on the worker */
    uint64_t deadline;      /* CLOCK_MONOTONIC ns; 0: no tick wanted */
    int fd;
    uint32_t events;
    int dead;               /* removed: no more callbacks; destroyed at the end of the round */
    struct vd_worker *worker;
    struct vd_source *next;
};

struct vd_queue {
    pthread_mutex_t lock;
    struct vd_device *dev;
    struct vd_worker *worker;
    struct vd_aio *aio;     /* its worker's I/O context */
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
    int draining;           /* GET_VRING_BASE asked: take nothing new, finish what is pending */
    int event_idx, indirect;
    int packed;             /* VIRTIO_F_RING_PACKED: desc is the one ring; avail and used are the
                               driver's and the device's event suppression areas */
    int log_used;           /* VHOST_VRING_F_LOG: log used-ring writes at used_gpa */
    uint64_t used_gpa;      /* SET_VRING_ADDR's log_guest_addr */
    int log_marked;         /* marked the log since the last vd_log_kick */
    uint32_t chain_limit;
    /* ring state, owned by the worker while started */
    uint8_t *desc, *avail, *used; /* host pointers */
    uint16_t last_avail, used_idx, signalled_used;
    /* packed: last_avail and used_idx are ring positions (0..num-1) with these wrap counters */
    uint16_t avail_wrap, used_wrap, signalled_wrap;
    uint32_t used_puts, signalled_puts; /* used entries written, and as of the last signal decision */
    int batch_open;         /* packed: the first used descriptor of a batch waits at batch_pos for */
    uint16_t batch_pos, batch_flags; /* its flags, which make the whole batch visible at once */
    uint16_t avail_known;   /* device-driven use: entries from last_avail on known to be
                               available (vring.c); 0 whenever last_avail is set */
    int signalled_valid;
    int broken;
    int fresh;              /* used_idx must be read from the ring before first use */
    char errmsg[VD_ERRMSG];
    int error_pending;      /* errmsg not yet collected by the control plane */
    int redo_noted;         /* requests lined up to redo at the last start, not yet collected (0: none) */
    struct vd_queue_stats st;
    /* requests (request.c): those taken and not yet completed live in the pool */
    struct vd_reqpool *pool;
    uint32_t mem_refs;      /* pending requests mapped against dev->mem */
    uint64_t buf_bytes;     /* scratch memory the pending requests hold */
    int starved;            /* a request waits for scratch memory: take it again after a completion */
    int resume;             /* starved no more: the worker must come back (engine.c) */
    int dirty;              /* completions not yet published (engine.c publishes them) */
    uint16_t dirty_from;    /* used index before them */
    struct vd_queue *dirty_next;
    /* VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD (inflight.c): this queue's region of
     * the front-end's inflight memfd (NULL = untracked). */
    uint8_t *inflight;
    uint32_t inflight_size; /* the ring size the region was made for */
    int inflight_recover;   /* look at the region before serving (set at start) */
    uint64_t inflight_counter;
    uint16_t resubmit[VD_MAX_QUEUE_SIZE]; /* to redo first, oldest first: split heads,
                                              packed the region entries holding their chains */
    uint16_t if_head[VD_MAX_QUEUE_SIZE];  /* packed: region entry of each pending buffer id */
    uint16_t if_free[VD_MAX_QUEUE_SIZE];  /* packed: region entries free for copies of descriptors */
    uint32_t if_nfree;
    int nresubmit, resubmit_pos;
    struct iovec scratch[VD_MAX_IOV]; /* a chain is mapped here first */
    struct vd_queue *poll_next;
    struct vd_source kick_src; /* in the worker's epoll while it has a kick fd */
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
    struct vd_mem *mem;     /* current memory table; NULL: none */
    vd_handle_fn handle;
    void (*rx_kick)(void *ctx, int queue); /* device-driven queues: the driver added buffers */
    /* Optional: a batch of handle() calls on q ended, or broke (q->lock held;
     * e.g. net lets go of the rx queue its tx batch delivered into). */
    void (*batch_done)(void *ctx, struct vd_queue *q);
    void *ctx;
    void (*release)(void *ctx); /* called when the device is gone and no I/O of it is pending */
    size_t req_priv;        /* bytes of device state per request */
    int event_fd;           /* written when a queue breaks or drained; the control plane looks */
    uint64_t poll_ns;       /* busy-poll window of a queue that ran empty; 0 = off */
    int needs_reset;
    int timing;             /* measure request latency (metrics on): two clock reads per request */
    /* Dirty-page logging (live migration), changed with every queue lock
     * held: log_on = VHOST_F_LOG_ALL acked and a log area mapped. */
    int log_on;
    uint8_t *log;           /* the front-end's bitmap, one bit per VD_LOG_PAGE */
    uint64_t log_size;      /* its bytes */
    int log_fd;             /* SET_LOG_FD's eventfd, or -1 */
    /* Requests still pending when their queue stopped (disconnect, reset)
     * are orphans: their I/O finishes, nothing is written back.  Until the
     * last one is done no queue of the device takes new requests (an old
     * write must not land after a new one) and the device is not freed. */
    pthread_mutex_t life;
    int orphans;            /* orphaned pools; read without the lock as a hint */
    int dying;              /* vd_device_free was called */
    struct vd_queue q[];
};

static inline uint64_t vd_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint16_t vd_rd16(const uint8_t *p)
{
    uint16_t v;
    __atomic_load((const uint16_t *)p, &v, __ATOMIC_RELAXED);
    return v;
}

static inline void vd_wr16(uint8_t *p, uint16_t v)
{
    __atomic_store((uint16_t *)p, &v, __ATOMIC_RELAXED);
}

/* ---- the ring (vring.c); q->lock held by the caller throughout.  One
 * interface for both layouts: last_avail and used_idx are split free-running
 * indices, or packed ring positions with their wrap counters. */
int vd_queue_translate(struct vd_queue *q, char *err, size_t errlen);
void vd_queue_fail(struct vd_queue *q, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Chains made available and not taken: split their number, packed 1 or 0; -1 after failing the queue. */
int vd_ring_pending(struct vd_queue *q);
/* Walk the next available chain into c and iov (at most maxiov) without
 * taking it; -1 after failing the queue.  vd_ring_advance takes it. */
int vd_ring_peek(struct vd_queue *q, struct vd_chain *c, struct iovec *iov, int maxiov);
void vd_ring_advance(struct vd_queue *q, const struct vd_chain *c);
/* Walk a split chain at head, or a packed chain held as n descriptor copies
 * at d (c->pos set by the caller), for requests redone after a restart. */
int vd_ring_map_split(struct vd_queue *q, uint16_t head, struct vd_chain *c, struct iovec *iov, int maxiov);
int vd_ring_map_packed(struct vd_queue *q, const struct vring_packed_desc *d, int n, struct vd_chain *c,
                       struct iovec *iov, int maxiov);
uint16_t vd_ring_driver_avail(const struct vd_queue *q);
/* Prefetch the descriptor of the chain desc_ahead after the one at
 * last_avail and the first buffer line of the one buf_ahead after it;
 * pending: chains known to be available (split rings). */
void vd_ring_prefetch_ahead(const struct vd_queue *q, int pending, unsigned desc_ahead, unsigned buf_ahead);
void vd_ring_read_fresh_used(struct vd_queue *q);
void vd_ring_notify_enable(struct vd_queue *q, int on);
void vd_ring_put_used(struct vd_queue *q, uint16_t id, uint16_t ndesc, uint32_t len);
void vd_ring_expose_used(struct vd_queue *q);
/* End of a batch that began at used index old: expose it, signal if wanted. */
void vd_ring_publish_used(struct vd_queue *q, uint16_t old);
int vd_queue_want_kick(struct vd_queue *q);
/* Device-driven use (net rx): pop returns 1 with req mapped into iov, 0 when
 * the ring is empty, -1 when the queue broke.  A mark taken before popping
 * lets rewind give `popped` chains back. */
int vd_queue_ready(struct vd_queue *q);
int vd_queue_pop(struct vd_queue *q, struct vd_req *req, struct iovec *iov, int maxiov);
uint32_t vd_queue_avail_mark(const struct vd_queue *q);
void vd_queue_rewind(struct vd_queue *q, uint32_t mark, int popped);
int vd_queue_has_avail(struct vd_queue *q);
void vd_queue_push(struct vd_queue *q, uint16_t id, uint16_t ndesc, uint32_t len);
void vd_queue_flush(struct vd_queue *q);

/* ---- inflight tracking (inflight.c) */
int vd_inflight_begin(struct vd_queue *q, const struct vd_chain *c);
void vd_inflight_cancel(struct vd_queue *q, uint16_t id);
/* Instead of vd_ring_put_used while tracked: the used entry, written so that
 * a crash at any point leaves the region telling whether it was seen. */
void vd_inflight_complete(struct vd_queue *q, uint16_t id, uint16_t ndesc, uint32_t len);
int vd_inflight_recover(struct vd_queue *q);
/* The k-th request to redo, walked into c and iov; -1 after failing the queue. */
int vd_inflight_chain(struct vd_queue *q, int k, struct vd_chain *c, struct iovec *iov, int maxiov);

/* ---- serving a queue (request.c), q->lock held.  process returns VD_MORE
 * when it stopped after VD_BUDGET requests with more waiting (the caller
 * must come back: notifications are left disabled), VD_IDLE when the ring ran
 * empty and notifications are enabled again (or the queue may not take
 * requests now), or, with `quiet`, VD_QUIET when the ring ran empty and
 * notifications were left disabled (the caller polls the ring, and
 * re-enables them with vd_queue_want_kick). */
enum { VD_IDLE = 0, VD_MORE = 1, VD_QUIET = 2 };
int vd_queue_process(struct vd_queue *q, int quiet);
/* A pool for q->num requests (queue start). */
int vd_reqs_start(struct vd_queue *q, char *err, size_t errlen);
/* The queue stops: its pending requests become orphans (1 returned: the
 * device has one more orphaned pool). */
int vd_reqs_stop(struct vd_queue *q);
uint32_t vd_reqs_pending(const struct vd_queue *q);
/* The device's memory table changes (every queue lock held). */
void vd_reqs_mem_swap(struct vd_device *d, struct vd_mem *fresh);
void vd_reqs_free(struct vd_queue *q);
/* An I/O of a request finished (engine.c's reap loop, the request's queue
 * lock held): run the device's completion under a SIGBUS guard.  Returns 1
 * when it was the last request of an orphaned pool (the pool is freed). */
struct vd_io;
int vd_reqs_io_done(struct vd_io *io, int64_t res);
struct vd_queue *vd_req_queue(const struct vd_req *req);

/* ---- event sources of the workers (engine.c).  add and remove from any
 * thread; set (a new fd or events) and deadlines only on the source's
 * worker, e.g. in its callbacks, or under a lock of the source's owner that
 * every set and remove of it takes.  tick must not add or remove sources. */
int vd_source_add(vd_engine *e, int worker, struct vd_source *src, int fd, uint32_t events);
int vd_source_set(struct vd_source *src, int fd, uint32_t events);
void vd_source_remove(struct vd_source *src);
/* The I/O context of a worker (stores that run on one worker use it). */
struct vd_aio *vd_engine_aio(vd_engine *e, int worker);
/* The worker serving q (for vd_source_add: a source that fills q runs there). */
int vd_queue_worker(const struct vd_queue *q);
/* Wait until every worker has finished a round that began after this call:
 * afterwards none runs a callback of a source removed before it.  Not from
 * a worker. */
void vd_engine_sync(vd_engine *e);

/* ---- the SIGBUS guard (guard.c) */
void vd_guard_install(void);
/* run fn(arg) so that a SIGBUS on guest memory breaks q, not the daemon */
int vd_run_guarded(struct vd_queue *q, int (*fn)(void *), void *arg);
/* run fn(arg); a SIGBUS inside returns VD_FAULTED with the address in *addr */
#define VD_FAULTED (-1000)
int vd_try_guarded(int (*fn)(void *), void *arg, void **addr);

#endif
