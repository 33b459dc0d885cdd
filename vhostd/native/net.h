/* virtio-net inside the data plane: what the device (net.c) and its ports
 * (net_switch.c, net_tap.c) share.  Nothing outside these three files uses it.
 *
 * Lock order: a tx queue's lock (held by its worker while the device
 * handles a batch) -> one rx queue's lock at a time (the receiver's, kept
 * across the batch by struct rx_hold; released before another is taken) ->
 * a TAP port's arm lock.  The switch's port table is read with no lock
 * (net_switch.c says why that is safe); its writers' lock and its fdb lock
 * take no other lock.
 */
#ifndef VHOSTD_NET_H
#define VHOSTD_NET_H

#include <stdint.h>
#include <sys/uio.h>

#include "vd.h"

#define ETH_HLEN 14
#define MAX_FRAME (65535 + ETH_HLEN) /* largest frame after the virtio-net header */
#define MAX_HDR 12

struct net_hdr {
    uint8_t flags, gso_type;
    uint16_t hdr_len, gso_size, csum_start, csum_offset, num_buffers;
} __attribute__((packed));

/* A frame to deliver: its virtio-net header, then its bytes from an iovec list. */
struct frame {
    struct net_hdr hdr;
    const struct iovec *iov;
    int niov;
    uint64_t len; /* bytes after the header */
};

/* One TAP queue (net_tap.c).  Its fd is an event source of the worker that
 * serves rx queue `qp`; the source waits for EPOLLIN while `armed`, i.e.
 * unless the last batch found no guest buffer (then a kick of the rx queue
 * arms it again). */
struct tap_port {
    struct vd_net *net;
    int qp;
    int fd;
    struct vd_source src;
    uint8_t *buf;              /* one frame read from the TAP (MAX_HDR + MAX_FRAME) */
    int target;                /* the rx pair this batch fills (tap_target) */
    pthread_mutex_t lock;      /* orders arming (tap_wake) against disarming (a batch) */
    int running;               /* its source is in a worker's epoll */
    int armed;                 /* waiting for EPOLLIN */
    int dead;                  /* the interface went away under us: never read again */
    uint64_t wakes;            /* bumped by tap_wake: a disarm decided before a wake is void */
};

/* A frame source holding an rx queue across a tx batch (net.c, see
 * vd_net_handle): consecutive frames to the same rx queue share its lock and
 * one used-ring update. */
struct rx_hold {
    struct vd_queue *q;
    unsigned frames;           /* delivered since the last publish */
    uint64_t now;              /* the switch's coarse clock, read once per batch (0: not yet) */
};

/* A tx queue pair's last learn and lookup in its switch (net_switch.c). */
struct sw_cache {
    uint64_t gen;              /* the switch's table generation they belong to */
    uint8_t src[6], dst[6];
    int dst_port;              /* -1: unknown, flood */
    uint64_t learned, looked;  /* when (coarse ns); 0: not valid */
};

struct vd_net {
    struct vd_net_params p;
    vd_device *dev;
    uint32_t hdr_len;
    uint64_t features;
    int ctrl_queue;
    int active_pairs;
    int pairs_set;      /* the driver sent VQ_PAIRS_SET since the last reset */
    uint32_t mtu;       /* what config space tells the driver (0: no limit) */
    uint8_t cfg_mac[6]; /* the configured MAC: p.mac follows MAC_ADDR_SET until a reset */
    uint8_t rx_mode[6]; /* promisc, allmulti, alluni, nomulti, nouni, nobcast (recorded) */
    struct vd_switch *sw;
    int sw_port;
    struct tap_port tap[VD_NET_MAX_QP];
    struct rx_hold hold[VD_NET_MAX_QP]; /* tx queue pair i's, while its worker handles a batch */
    struct sw_cache swc[VD_NET_MAX_QP];
    struct vd_net_stats st[VD_NET_MAX_QP];
};

/* ---- net.c */
/* Fill rx buffers of n's queue pair qp with one frame; 0 if delivered, -1
 * if dropped.  hold: NULL to take and release the rx lock here and publish
 * at once; else the caller's hold (see struct rx_hold), which this call
 * moves to qp's rx queue if it held another.  *src_fault: see net.c. */
int net_deliver(struct vd_net *n, int qp, const struct frame *f, struct rx_hold *hold, void **src_fault);
/* Publish what the hold delivered and let its queue go. */
void net_release(struct rx_hold *hold);

/* ---- net_switch.c: forward a frame to the other ports of src's switch */
void switch_forward(struct vd_net *src, int qp, const struct frame *f, struct rx_hold *hold, void **src_fault);

/* ---- net_tap.c */
int tap_start(struct vd_net *n);
void tap_stop(struct vd_net *n);
/* tx: one frame (virtio-net header first) straight from guest memory. */
int tap_send(struct vd_net *n, int qp, const struct iovec *iov, int niov, uint64_t bytes);
/* The rx pair port qp fills may take frames again: read its TAP again. */
void tap_wake(struct vd_net *n, int qp);
/* rx queue pair qp got buffers, or was enabled or disabled: wake the TAP
 * queues that fill it, and its own (which may now fill another pair). */
void tap_rx_kick(struct vd_net *n, int qp);

#endif
