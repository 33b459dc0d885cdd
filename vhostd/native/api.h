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
    int started, enabled, broken, polled;
    uint16_t last_avail, used_idx;
    uint64_t requests, kicks, notifies, out_bytes, in_bytes;
};

vd_engine *vd_engine_new(int nworkers);
void vd_engine_free(vd_engine *e);

/* A device: nqueues virtqueues served by the engine's workers; each request
 * goes to handle(ctx, req, queue). */
vd_device *vd_device_new(vd_engine *e, int nqueues, uint32_t max_queue_size,
                         uint32_t (*handle)(void *ctx, struct vd_req *req, int queue), void *ctx, int event_fd);
void vd_device_free(vd_device *d);
void vd_device_reset(vd_device *d);
void vd_device_clear_memory(vd_device *d);
void vd_device_set_features(vd_device *d, uint64_t features);
/* Queues in mask are device-driven (net rx): a kick calls rx_kick instead of the handler. */
void vd_device_set_rx_queues(vd_device *d, uint64_t mask, void (*rx_kick)(void *ctx, int queue));
/* Busy polling: a queue that ran empty keeps notifications disabled and is
 * re-checked by its worker for up to poll_us microseconds (0 = off). */
void vd_device_set_poll(vd_device *d, uint32_t poll_us);
int vd_device_needs_reset(vd_device *d);
int vd_device_take_error(vd_device *d, char *buf, size_t len);

int vd_mem_set_table(vd_device *d, int n, const struct vd_region_desc *regions, const int *fds, char *err, size_t errlen);
int vd_mem_add_region(vd_device *d, const struct vd_region_desc *region, int fd, char *err, size_t errlen);
int vd_mem_remove_region(vd_device *d, const struct vd_region_desc *region, char *err, size_t errlen);

int vd_queue_set_num(vd_device *d, int i, uint32_t num, char *err, size_t errlen);
int vd_queue_set_addr(vd_device *d, int i, uint64_t desc, uint64_t used, uint64_t avail, char *err, size_t errlen);
int vd_queue_set_base(vd_device *d, int i, uint16_t base, char *err, size_t errlen);
int vd_queue_get_base(vd_device *d, int i, uint16_t *base, char *err, size_t errlen);
int vd_queue_set_kick(vd_device *d, int i, int fd, char *err, size_t errlen);
int vd_queue_set_call(vd_device *d, int i, int fd, char *err, size_t errlen);
int vd_queue_set_err(vd_device *d, int i, int fd, char *err, size_t errlen);
int vd_queue_set_enable(vd_device *d, int i, int enable, char *err, size_t errlen);
void vd_queue_poke(vd_device *d, int i);
/* Latency histograms (for metrics): off by default, they cost two clock reads per request. */
enum { VD_LAT_BUCKETS = 24 };
void vd_device_set_timing(vd_device *d, int on);
/* Inflight tracking (split rings): region = this queue's part of the inflight
 * memfd, at least vd_inflight_queue_bytes(queue size) long; NULL stops it. */
uint64_t vd_inflight_queue_bytes(uint32_t queue_size);
int vd_queue_set_inflight(vd_device *d, int i, void *region, char *err, size_t errlen);
int vd_queue_get_latency(vd_device *d, int i, uint64_t *buckets, uint64_t *sum_ns);
int vd_queue_get_stats(vd_device *d, int i, struct vd_queue_info *out);

/* virtio-blk (blk.c) */
struct vd_blk_params {
    int fd;                   /* the image; -1: a null disk (no data kept) */
    uint64_t capacity;        /* in 512-byte sectors */
    int readonly;
    int is_blockdev;
    int discard, write_zeroes;
    uint32_t max_discard_sectors, max_discard_seg;
    uint32_t max_write_zeroes_sectors, max_write_zeroes_seg;
    char serial[20];
};
struct vd_blk_stats {
    uint64_t reads, writes, flushes, discards, write_zeroes, get_ids, read_bytes, write_bytes, errors, unsupported;
};
vd_blk *vd_blk_new(const struct vd_blk_params *p, int nqueues);
void vd_blk_free(vd_blk *b);
uint32_t vd_blk_handle(void *ctx, struct vd_req *req, int queue);
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
uint32_t vd_net_handle(void *ctx, struct vd_req *req, int queue);
void vd_net_rx_kick(void *ctx, int queue);
int vd_net_inject(vd_net *n, const void *frame, size_t len);
void vd_net_get_stats(vd_net *n, int qp, struct vd_net_stats *out);
vd_switch *vd_switch_new(void);
void vd_switch_free(vd_switch *sw);
int vd_switch_attach(vd_switch *sw, vd_net *n);
void vd_switch_detach(vd_switch *sw, vd_net *n);

#endif
