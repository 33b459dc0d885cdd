/* The data plane's control API, called from Python through cffi.
 * build.py hands this file (minus preprocessor lines) to cffi's cdef, so it
 * holds only plain declarations.  Functions that can fail return 0 or a
 * negative errno and write a one-line reason into err. */
#ifndef VHOSTD_API_H
#define VHOSTD_API_H
#include <stddef.h>
#include <stdint.h>

typedef struct vd_engine vd_engine;
typedef struct vd_device vd_device;
typedef struct vd_blk vd_blk;
typedef struct vd_net vd_net;
typedef struct vd_switch vd_switch;
struct vd_req;

struct vd_region_desc {
    uint64_t gpa, size, uva, mmap_offset;
};

struct vd_queue_info {
    uint32_t num;
    int started, enabled, broken, polled, packed;
    uint16_t last_avail, used_idx;  /* packed: ring positions */
    uint16_t driver_avail;    /* the avail index the driver has written (ahead of last_avail: unseen requests) */
    uint64_t requests, kicks, notifies, out_bytes, in_bytes;
    uint32_t pending;         /* requests submitted and not yet completed */
};

vd_engine *vd_engine_new(int nworkers);
void vd_engine_free(vd_engine *e);
/* 1 if every worker has an io_uring ring; else 0 and why. */
int vd_engine_uring(vd_engine *e, char *why, size_t len);
/* The next worker in turn, for a device whose queues must all share one
 * (vd_device_new's worker; -1 there spreads the queues over the workers). */
int vd_engine_pick_worker(vd_engine *e);

/* A device: nqueues virtqueues served by the engine's workers; each request
 * goes to handle(ctx, req), which returns VD_REQ_DONE, VD_REQ_PENDING or
 * VD_REQ_RETRY (vd.h).  Each request carries req_priv bytes for the device.
 * With release, the device takes over one reference to ctx and drops it
 * with release(ctx) once it is freed and none of its I/O is pending. */
vd_device *vd_device_new(vd_engine *e, int nqueues, uint32_t max_queue_size,
                         int (*handle)(void *ctx, struct vd_req *req), void *ctx, size_t req_priv,
                         void (*release)(void *ctx), int event_fd, int worker);
void vd_device_free(vd_device *d);
void vd_device_reset(vd_device *d);
void vd_device_clear_memory(vd_device *d);
void vd_device_set_features(vd_device *d, uint64_t features);
/* The dirty-page log (SET_LOG_BASE): size bytes at base, mapped by the
 * caller, who keeps it mapped until it is replaced (NULL: none).  Refused
 * when it does not cover the memory table or a logged used ring.  Logging
 * runs while VHOST_F_LOG_ALL is acked and a log is set. */
int vd_device_set_log(vd_device *d, void *base, uint64_t size, char *err, size_t errlen);
/* SET_LOG_FD: an eventfd written after batches that marked the log; the
 * device owns it from here (-1: none). */
void vd_device_set_log_fd(vd_device *d, int fd);
/* Queues in mask are device-driven (net rx): a kick calls rx_kick instead of the handler. */
void vd_device_set_rx_queues(vd_device *d, uint64_t mask, void (*rx_kick)(void *ctx, int queue));
/* Busy polling: a queue that ran empty keeps notifications disabled and is
 * re-checked by its worker for up to poll_us microseconds (0 = off). */
void vd_device_set_poll(vd_device *d, uint32_t poll_us);
int vd_device_needs_reset(vd_device *d);
int vd_device_take_error(vd_device *d, char *buf, size_t len);
/* A queue that started on an inflight area holding requests a previous
 * back-end took and never completed: its index (and *count, the requests it
 * redoes), once per start; -1 when there is none to report.  The event fd
 * is written when there is. */
int vd_device_take_redo(vd_device *d, int *count);
/* Break queue i with msg as its error (NEEDS_RESET), as a bad ring would. */
int vd_device_fail(vd_device *d, int i, const char *msg, char *err, size_t errlen);
/* Stopped queues' requests still in flight (their completion writes the event fd). */
int vd_device_orphans(vd_device *d);

int vd_mem_set_table(vd_device *d, int n, const struct vd_region_desc *regions, const int *fds, char *err, size_t errlen);
int vd_mem_add_region(vd_device *d, const struct vd_region_desc *region, int fd, char *err, size_t errlen);
int vd_mem_remove_region(vd_device *d, const struct vd_region_desc *region, char *err, size_t errlen);

int vd_queue_set_num(vd_device *d, int i, uint32_t num, char *err, size_t errlen);
/* flags: VHOST_VRING_F_LOG (1): log used-ring writes at log_gpa while logging is on. */
int vd_queue_set_addr(vd_device *d, int i, uint64_t desc, uint64_t used, uint64_t avail, uint32_t flags,
                      uint64_t log_gpa, char *err, size_t errlen);
/* base: split rings the next avail index; packed rings bits 0-14 position, 15 wrap counter
 * (and bits 16-31 the used side, else the same) */
int vd_queue_set_base(vd_device *d, int i, uint32_t base, char *err, size_t errlen);
/* GET_VRING_BASE in two steps, so that the control plane never waits for a
 * disk: drain (take nothing new; pending = requests still in flight; the
 * device's event fd is written when they are done), then get_base (stops
 * the queue; whatever is still pending then is orphaned). */
int vd_queue_drain(vd_device *d, int i, uint32_t *pending, char *err, size_t errlen);
uint32_t vd_queue_pending(vd_device *d, int i);
int vd_queue_get_base(vd_device *d, int i, uint32_t *base, char *err, size_t errlen);
int vd_queue_set_kick(vd_device *d, int i, int fd, char *err, size_t errlen);
int vd_queue_set_call(vd_device *d, int i, int fd, char *err, size_t errlen);
int vd_queue_set_err(vd_device *d, int i, int fd, char *err, size_t errlen);
int vd_queue_set_enable(vd_device *d, int i, int enable, char *err, size_t errlen);
void vd_queue_poke(vd_device *d, int i);
/* Latency histograms (for metrics): off by default, they cost two clock reads per request. */
enum { VD_LAT_BUCKETS = 24 };
void vd_device_set_timing(vd_device *d, int on);
/* Inflight tracking (split and packed rings): region = this queue's part of the inflight
 * memfd, vd_inflight_queue_bytes(queue_size) long (a ring larger than
 * queue_size breaks the queue when it starts); NULL stops it. */
uint64_t vd_inflight_queue_bytes(uint32_t queue_size);
int vd_queue_set_inflight(vd_device *d, int i, void *region, uint32_t queue_size, char *err, size_t errlen);
int vd_queue_get_latency(vd_device *d, int i, uint64_t *buckets, uint64_t *sum_ns);
int vd_queue_get_stats(vd_device *d, int i, struct vd_queue_info *out);

/* Ring-level access for tests (probe.c): queue i of a device whose queues
 * are all device-driven without an rx_kick (vd_device_set_rx_queues(d,
 * mask, NULL)) is served by the caller.  pop: 1 with the next chain (its
 * buffers as host address + length, at most max), 0 when none is
 * available, -1 when the queue broke or is not running.  push writes a used
 * entry, publish makes them visible and signals the call fd if the driver
 * wants it, notify(on) asks for kicks (returns 1 if a chain arrived
 * meanwhile) or (off) suppresses them. */
struct vd_probe_chain { uint16_t id, ndesc; int nout, nin; uint64_t out_bytes, in_bytes; };
struct vd_probe_buf { uint64_t host, len; };
int vd_probe_pop(vd_device *d, int i, struct vd_probe_chain *out, struct vd_probe_buf *bufs, int max);
void vd_probe_push(vd_device *d, int i, uint16_t id, uint16_t ndesc, uint32_t len);
void vd_probe_publish(vd_device *d, int i);
int vd_probe_notify(vd_device *d, int i, int on);

/* Stores (store.h): where a disk's data lives.  A new store holds one
 * reference for its creator; a blk device takes its own. */
typedef struct vd_store vd_store;
void vd_store_ref(vd_store *s);
void vd_store_unref(vd_store *s);
/* Lines a store has for the daemon's log: event_fd (an eventfd, or -1) is
 * written when there are some; take returns 1 with the oldest in buf. */
void vd_store_set_event_fd(vd_store *s, int fd);
int vd_store_take_note(vd_store *s, char *buf, size_t len);
/* Wait up to timeout_ms for stores still closing on threads of their own
 * (an RBD image flushing its cache); returns how many are left. */
int vd_stores_settle(int timeout_ms);

/* The file store (file.c): an image file or a block device.  It owns fd once created. */
enum { VD_FILE_INLINE = 0, VD_FILE_URING = 1, VD_FILE_THREADS = 2 }; /* where its I/O runs */
struct vd_file_params {
    int fd;
    int engine;               /* VD_FILE_* */
    int punt;                 /* io_uring: always hand the I/O to kernel workers (the file system may block) */
    int is_blockdev;
    int direct;               /* fd has O_DIRECT: buffers must be aligned, else they are bounced */
    uint32_t dio_mem_align, dio_len_align;
};
vd_store *vd_file_store_new(const struct vd_file_params *p);
/* What choosing the engine needs to know about an image. */
struct vd_file_info {
    int64_t fs_type;              /* statfs f_type of the file system holding it */
    int is_blockdev;
    uint32_t dio_mem_align, dio_offset_align; /* O_DIRECT alignment (statx); 0 if unknown */
    uint32_t logical_block;       /* block devices: the logical block size */
};
int vd_file_probe(int fd, struct vd_file_info *out);
/* Whether io_uring works here (probed once); why it does not otherwise. */
int vd_uring_available(char *why, size_t whylen);

/* The NBD store (nbd.c): an export of an NBD server, through libnbd.  new
 * connects at once (it blocks: call it off the event loop); attach puts its
 * connections on a worker, where the device's queues must run too. */
enum { VD_NBD_MAX_CONN = 16 };
struct vd_nbd_params {
    char uri[1024];
    int connections;          /* wanted; 1 unless the server allows multi-conn */
    uint32_t reconnect_delay_ms; /* longest wait between reconnect attempts */
    uint32_t io_timeout_ms;   /* an operation fails after waiting this long; 0 = never */
};
struct vd_nbd_info {
    int64_t size;
    int readonly, can_flush, can_trim, can_zero, multi_conn;
    uint32_t block_min;
    int connections, ready;
    uint64_t reconnects, timeouts;
};
int vd_nbd_available(void);
vd_store *vd_nbd_store_new(const struct vd_nbd_params *p, char *err, size_t errlen);
int vd_nbd_store_attach(vd_store *s, vd_engine *e, int worker);
void vd_nbd_store_info(vd_store *s, struct vd_nbd_info *out);

/* The RBD store (rbd.c): an image in a Ceph cluster, through librbd.  new
 * connects and opens the image (it blocks: call it off the event loop);
 * attach puts its stall watch on a worker. */
struct vd_rbd_params {
    char conf[512];           /* ceph.conf */
    char user[128];           /* the client's id: client.<user> */
    char keyring[512];        /* "": where ceph.conf says */
    uint32_t io_timeout_s;    /* an operation fails after waiting this long; 0 = never */
    uint32_t warn_after_s;    /* the log says so when one waits this long */
    char pool[128], ns[128], image[128], snap[128]; /* ns, snap: "" = none */
    int readonly;
};
struct vd_rbd_info {
    int64_t size;
    uint64_t object_size;
    int readonly;
    int inflight, stalled;    /* stalled: the oldest operation waits too long */
    uint64_t oldest_ms, stalls, timeouts;
};
int vd_rbd_available(void);
vd_store *vd_rbd_store_new(const struct vd_rbd_params *p, char *err, size_t errlen);
int vd_rbd_store_attach(vd_store *s, vd_engine *e, int worker);
void vd_rbd_store_info(vd_store *s, struct vd_rbd_info *out);
/* Take (acquire 1) or drop librbd's exclusive lock on the image; blocks
 * (cluster round-trips): call it off the event loop and never on a worker. */
int vd_rbd_store_lock(vd_store *s, int acquire, char *err, size_t errlen);

/* virtio-blk (blk.c) */
struct vd_blk_params {
    vd_store *store;          /* where the data lives (the device takes a reference); NULL: a null disk */
    uint64_t capacity;        /* in 512-byte sectors */
    int readonly;
    int discard, write_zeroes;
    uint32_t max_discard_sectors, max_discard_seg;
    uint32_t max_write_zeroes_sectors, max_write_zeroes_seg;
    char serial[20];
};
struct vd_blk_stats {
    uint64_t reads, writes, flushes, discards, write_zeroes, get_ids, read_bytes, write_bytes, errors, unsupported;
    uint64_t bounced;         /* requests that went through a bounce buffer */
};
vd_blk *vd_blk_new(const struct vd_blk_params *p, int nqueues);
vd_blk *vd_blk_ref(vd_blk *b);
void vd_blk_unref(void *b);
size_t vd_blk_req_size(void);
int vd_blk_handle(void *ctx, struct vd_req *req);
void vd_blk_get_stats(vd_blk *b, int queue, struct vd_blk_stats *out);

/* virtio-net (net.c) */
enum { VD_NET_TAP = 0, VD_NET_SWITCH = 1, VD_NET_LOOPBACK = 2 };
enum { VD_NET_MAX_QP = 16 };
struct vd_net_params {
    int backend;
    int nqp;                   /* queue pairs */
    int ctrl;                  /* a control queue follows the pairs */
    int tap_fds[16];           /* backend tap: one non-blocking fd per queue pair */
    uint8_t mac[6];
};
struct vd_net_stats {
    uint64_t tx_frames, tx_bytes, tx_dropped, tx_bad, rx_frames, rx_bytes, rx_dropped;
};
vd_net *vd_net_new(const struct vd_net_params *p);
int vd_net_start(vd_net *n, vd_device *dev);
void vd_net_stop(vd_net *n);
void vd_net_free(vd_net *n);
void vd_net_set_features(vd_net *n, uint64_t features);
void vd_net_reset(vd_net *n);
void vd_net_set_mtu(vd_net *n, uint32_t mtu);
void vd_net_get_mac(vd_net *n, uint8_t *mac);
uint32_t vd_net_hdr_len(vd_net *n);
int vd_net_handle(void *ctx, struct vd_req *req);
void vd_net_rx_kick(void *ctx, int queue);
int vd_net_inject(vd_net *n, const void *frame, size_t len);
void vd_net_get_stats(vd_net *n, int qp, struct vd_net_stats *out);
vd_switch *vd_switch_new(void);
void vd_switch_free(vd_switch *sw);
int vd_switch_attach(vd_switch *sw, vd_net *n);
void vd_switch_detach(vd_switch *sw, vd_net *n);

#endif
