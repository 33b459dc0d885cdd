/* virtio-net device logic (virtio 1.2 section 5.1): what a frame is, which
 * receiver may take it, how it fills rx buffers, the control queue.
 *
 * Queues: rx0, tx0, rx1, tx1, ..., then the control queue.  TX chains arrive
 * as requests (vd_net_handle) and go to the port's back-end; RX buffers are
 * taken by the device when it has a frame (net_deliver).  Back-ends:
 *   tap       a TAP interface (net_tap.c)
 *   switch    a learning L2 switch between ports of this daemon (net_switch.c)
 *   loopback  every TX frame comes back on the same pair's RX queue
 * The virtio-net header travels with each frame (TAP understands it with
 * IFF_VNET_HDR), so checksum and GSO offloads pass through end to end.
 *
 * Frames move in bursts.  A tx batch (the requests one worker turn takes
 * off a tx queue) keeps the rx queue it delivers into locked from frame to
 * frame (struct rx_hold) and makes the receiver's used entries visible every
 * NET_RX_PUBLISH frames and at the end of the batch, not per frame: each
 * publish writes a cache line the other side polls and reads one it writes.
 * Publishing more rarely than that starves a driver that has few frames in
 * flight (it waits for the batch; measured in benchmarks/RESULTS.md).  Each
 * frame is copied once, from the sender's buffers into the receiver's.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "iov.h"
#include "net.h"

#define F_GUEST_CSUM 1
#define F_MTU 3
#define F_GUEST_TSO4 7
#define F_GUEST_TSO6 8
#define F_GUEST_ECN 9
#define F_GUEST_UFO 10
#define F_MRG_RXBUF 15
#define F_VERSION_1 32

#define HDR_F_NEEDS_CSUM 1
#define GSO_NONE 0
#define GSO_TCPV4 1
#define GSO_UDP 3
#define GSO_TCPV6 4
#define GSO_ECN 0x80

#define CTRL_RX 0
#define CTRL_MAC 1
#define CTRL_ANNOUNCE 3
#define CTRL_MQ 4
#define NET_OK 0
#define NET_ERR 1

#define MAX_RX_BUFS 64              /* mergeable buffers one frame may take */
#define RX_IOV 256
#ifndef NET_RX_PUBLISH
#define NET_RX_PUBLISH 8            /* frames into one rx queue between used-ring updates */
#endif

/* A counter only its lock's holder writes: no atomic read-modify-write
 * (readers, e.g. vd_net_get_stats, see a value that is at most a bit old). */
static inline void bump(uint64_t *c, uint64_t v)
{
    __atomic_store_n(c, __atomic_load_n(c, __ATOMIC_RELAXED) + v, __ATOMIC_RELAXED);
}

/* ---------------------------------------------------------------- rx delivery */

static int has(const vd_net *n, int bit)
{
    return !!(n->features & (1ull << bit));
}

/* Can this receiver take the frame as it is (offloads it negotiated)? */
static int acceptable(const vd_net *n, const struct net_hdr *h)
{
    uint8_t gso = h->gso_type & ~GSO_ECN;
    if ((h->flags & HDR_F_NEEDS_CSUM) && !has(n, F_GUEST_CSUM))
        return 0;
    if (gso == GSO_TCPV4 && !has(n, F_GUEST_TSO4))
        return 0;
    if (gso == GSO_TCPV6 && !has(n, F_GUEST_TSO6))
        return 0;
    if (gso == GSO_UDP && !has(n, F_GUEST_UFO))
        return 0;
    if ((h->gso_type & GSO_ECN) && !has(n, F_GUEST_ECN))
        return 0;
    return 1;
}

/* One frame going into one rx queue (net_deliver()); fill_buffers() runs
 * under a SIGBUS guard, so everything it must undo lives here. */
struct fill {
    vd_net *n;
    struct vd_queue *q;
    const struct frame *f;
    int publish;          /* make the used entries visible (and signal) at the end */
    volatile int popped;  /* buffers taken from the ring so far */
    uint32_t mark;        /* where the ring was before (vd_queue_rewind gives them back) */
};

/* 5.1.6.3.2 (device requirements): with VIRTIO_NET_F_MTU negotiated the
 * device MUST NOT pass a non-GSO packet larger than mtu plus the Ethernet
 * header (with an 802.1Q/802.1ad tag, that header is 4 bytes longer). */
static int fits_mtu(const vd_net *n, const struct frame *f)
{
    if (!has(n, F_MTU) || !n->mtu || (f->hdr.gso_type & ~GSO_ECN) != GSO_NONE)
        return 1;
    uint64_t limit = (uint64_t)n->mtu + ETH_HLEN;
    uint8_t et[2];
    if (vd_iov_read(f->iov, f->niov, 12, et, 2) == 2 &&
        ((et[0] == 0x81 && et[1] == 0x00) || (et[0] == 0x88 && et[1] == 0xa8)))
        limit += 4;
    return f->len <= limit;
}

/* Copy the frame into as many rx buffers as it needs and push them.  Every
 * guest memory access of a delivery happens in here (the frame itself may
 * be guest memory).  Returns 0, or -1 to drop (the caller gives back the
 * popped buffers). */
static int fill_buffers(void *arg)
{
    struct fill *c = arg;
    vd_net *n = c->n;
    struct vd_queue *q = c->q;
    const struct frame *f = c->f;
    int nbufs = 0;
    uint16_t ids[MAX_RX_BUFS], ndescs[MAX_RX_BUFS];
    uint32_t lens[MAX_RX_BUFS];
    uint8_t *nb_lo = NULL, *nb_hi = NULL; /* where num_buffers lands in the first buffer */
    struct iovec iov[RX_IOV];
    struct vd_req req;
    uint64_t total = n->hdr_len + f->len, done = 0;
    int mrg = has(n, F_MRG_RXBUF);
    struct net_hdr h = f->hdr;
    h.num_buffers = 0;
    if (!has(n, F_GUEST_CSUM))
        h.flags = 0; /* 5.1.6.4.1: without GUEST_CSUM the device MUST set flags to zero (DATA_VALID too) */
    if (!fits_mtu(n, f))
        return -1;

    while (done < total) {
        if (nbufs == MAX_RX_BUFS || (nbufs && !mrg))
            return -1; /* frame does not fit the buffers the driver posts */
        int r = vd_queue_pop(q, &req, iov, RX_IOV);
        if (r <= 0)
            return -1; /* no buffer (drop) or the queue broke */
        c->popped++;
        if (req.in_bytes == 0) {
            /* Retrying it would drop every later frame on it, silently. */
            vd_queue_fail(q, "queue %d: rx buffer at head %u has no device-writable part", q->index, req.head);
            return -1;
        }
        struct iovec *in = req.iov + req.nout;
        uint32_t put = 0;
        if (done == 0 && req.nin == 1 && f->niov == 1 && req.in_bytes >= total) {
            /* The common case, one piece on each side: two copies, no walk. */
            uint8_t *p = in[0].iov_base;
            memcpy(p, &h, n->hdr_len);
            memcpy(p + n->hdr_len, f->iov[0].iov_base, f->len);
            put = (uint32_t)total;
            if (n->hdr_len == MAX_HDR) {
                nb_lo = p + 10;
                nb_hi = p + 11;
            }
        } else {
            if (done < n->hdr_len) {
                put = vd_iov_write(in, req.nin, 0, (uint8_t *)&h + done, n->hdr_len - done);
                if (done == 0 && n->hdr_len == MAX_HDR) {
                    nb_lo = vd_iov_byte(in, req.nin, 10);
                    nb_hi = vd_iov_byte(in, req.nin, 11);
                }
            }
            /* then frame bytes from the source iovecs, straight into guest memory */
            uint64_t src_off = done + put - n->hdr_len;
            uint64_t room = req.in_bytes - put;
            if (src_off < f->len)
                put += vd_iov_copy(in, req.nin, put, f->iov, f->niov, src_off,
                                   f->len - src_off < room ? f->len - src_off : room);
        }
        if (__builtin_expect(q->dev->log_on, 0))
            vd_log_iov(q, q->dev->mem, in, req.nin, put);
        ids[nbufs] = req.head;
        ndescs[nbufs] = req.ndesc;
        lens[nbufs] = put;
        nbufs++;
        done += put;
        if (put == 0 && done < total)
            return -1; /* a buffer with no room would loop forever */
    }
    if (nb_lo && nb_hi) {
        *nb_lo = nbufs & 0xff;
        *nb_hi = nbufs >> 8;
    }
    for (int i = 0; i < nbufs; i++)
        vd_queue_push(q, ids[i], ndescs[i], lens[i]);
    if (c->publish)
        vd_queue_flush(q);
    return 0;
}

/* A SIGBUS in the receiver's memory breaks its queue. */
static void rx_fault(struct vd_queue *q)
{
    vd_queue_fail(q, "queue %d: guest memory access faulted (SIGBUS): the front-end shrank shared memory",
              q->index);
}

static int flush_rx(void *q)
{
    vd_queue_flush(q);
    return 0;
}

/* Make q's used entries visible; a fault there is the receiver's. */
static void rx_publish(struct vd_queue *q)
{
    void *addr;
    if (vd_queue_ready(q) && vd_try_guarded(flush_rx, q, &addr) == VD_FAULTED)
        rx_fault(q);
}

void net_release(struct rx_hold *hold)
{
    struct vd_queue *q = hold->q;
    if (!q)
        return;
    if (hold->frames)
        rx_publish(q);
    hold->q = NULL;
    hold->frames = 0;
    pthread_mutex_unlock(&q->lock);
}

/* The frame may come from another guest's memory (switch), so a SIGBUS
 * while copying is caught here, with the rx lock still held: if the fault
 * is in this receiver's memory, its rx queue breaks; if it is in the
 * source's, the frame is dropped, *src_fault tells the caller where, and the
 * caller, once it holds no lock, touches that address again under its own
 * guard (which then breaks the sender's queue, not this one). */
int net_deliver(vd_net *n, int qp, const struct frame *f, struct rx_hold *hold, void **src_fault)
{
    struct vd_net_stats *st = &n->st[qp];
    if (!n->dev || !acceptable(n, &f->hdr)) {
        __atomic_add_fetch(&st->rx_dropped, 1, __ATOMIC_RELAXED);
        return -1;
    }
    struct vd_queue *q = &n->dev->q[2 * qp];
    if (!hold) {
        pthread_mutex_lock(&q->lock);
    } else if (hold->q != q) {
        net_release(hold);
        pthread_mutex_lock(&q->lock);
        hold->q = q;
    }
    struct fill c = {.n = n, .q = q, .f = f, .publish = !hold || hold->frames + 1 >= NET_RX_PUBLISH,
                     .mark = vd_queue_avail_mark(q)};
    void *addr = NULL;
    /* not ready: no driver (yet), or the queue broke: a drop like any other */
    int rc = vd_queue_ready(q) ? vd_try_guarded(fill_buffers, &c, &addr) : -1;
    if (rc == VD_FAULTED) {
        if (vd_mem_owns(n->dev->mem, addr) || !src_fault)
            rx_fault(q);
        else
            *src_fault = addr;
        rc = -1;
    }
    if (rc == 0) {
        bump(&st->rx_frames, 1);
        bump(&st->rx_bytes, f->len);
        if (hold)
            hold->frames = c.publish ? 0 : hold->frames + 1;
    } else {
        vd_queue_rewind(q, c.mark, c.popped);
        __atomic_add_fetch(&st->rx_dropped, 1, __ATOMIC_RELAXED);
    }
    if (!hold)
        pthread_mutex_unlock(&q->lock);
    return rc;
}

/* The source of a frame faulted inside net_deliver(): touch the address
 * again, now that no lock is held, so that the caller's guard breaks its
 * queue.  (If the memory is back, nothing happens and the frame is just
 * lost.) */
static void refault(void *addr)
{
    if (addr)
        (void)*(volatile uint8_t *)addr;
}

/* ---------------------------------------------------------------- control queue */

static uint32_t ctrl_handle(vd_net *n, struct vd_req *req)
{
    uint8_t ack = NET_ERR;
    uint8_t hdr[2];
    struct iovec *in = req->iov + req->nout;
    if (req->in_bytes < 1)
        return 0;
    if (req->out_bytes < 2)
        goto done;
    vd_iov_read(req->iov, req->nout, 0, hdr, 2);
    uint64_t len = req->out_bytes - 2;
    switch (hdr[0]) {
    case CTRL_RX:
        if (hdr[1] <= 5 && len == 1) {
            vd_iov_read(req->iov, req->nout, 2, &n->rx_mode[hdr[1]], 1);
            ack = NET_OK;
        }
        break;
    case CTRL_MAC:
        if (hdr[1] == 1 && len == 6) { /* ADDR_SET */
            vd_iov_read(req->iov, req->nout, 2, n->p.mac, 6);
            ack = NET_OK;
        } else if (hdr[1] == 0) { /* TABLE_SET: two tables, u32 count then entries; checked, recorded as accepted */
            uint32_t c1 = 0, c2 = 0;
            if (len >= 8 && vd_iov_read(req->iov, req->nout, 2, &c1, 4) == 4 && c1 <= 4096 &&
                len >= 8 + 6ull * c1 && vd_iov_read(req->iov, req->nout, 6 + 6ull * c1, &c2, 4) == 4 &&
                c2 <= 4096 && len == 8 + 6ull * (c1 + c2))
                ack = NET_OK;
        }
        break;
    case CTRL_ANNOUNCE:
        if (hdr[1] == 0 && len == 0)
            ack = NET_OK;
        break;
    case CTRL_MQ:
        if (hdr[1] == 0 && len == 2) {
            uint16_t pairs;
            vd_iov_read(req->iov, req->nout, 2, &pairs, 2);
            if (pairs >= 1 && pairs <= n->p.nqp) {
                n->active_pairs = pairs;
                n->pairs_set = 1;
                ack = NET_OK;
                if (n->p.backend == VD_NET_TAP) /* TAP queues of pairs now (un)used: look again */
                    for (int i = 0; i < n->p.nqp; i++)
                        tap_wake(n, i);
            }
        }
        break;
    }
done:
    vd_iov_write(in, req->nin, req->in_bytes - 1, &ack, 1);
    return 1;
}


/* ---------------------------------------------------------------- tx */

static uint32_t handle(vd_net *n, struct vd_req *req, int queue)
{
    if (queue == n->ctrl_queue)
        return ctrl_handle(n, req);
    int qp = queue / 2;
    struct vd_net_stats *st = &n->st[qp];
    if (!(queue & 1) || qp >= n->p.nqp) /* rx queues are device-driven */
        return 0;
    if (req->out_bytes < n->hdr_len + ETH_HLEN || req->out_bytes > n->hdr_len + MAX_FRAME) {
        bump(&st->tx_bad, 1);
        return 0;
    }
    uint64_t len = req->out_bytes - n->hdr_len;
    if (n->p.backend == VD_NET_TAP) {
        if (tap_send(n, qp, req->iov, req->nout, req->out_bytes) < 0) {
            bump(&st->tx_dropped, 1);
            return 0;
        }
    } else {
        struct frame f = {.len = len};
        struct iovec one;
        if (req->nout == 1) {
            /* The common case (header and frame in one buffer): no walks. */
            memcpy(&f.hdr, req->iov[0].iov_base, n->hdr_len);
            one = (struct iovec){(uint8_t *)req->iov[0].iov_base + n->hdr_len, len};
            f.iov = &one;
            f.niov = 1;
        } else {
            vd_iov_read(req->iov, req->nout, 0, &f.hdr, n->hdr_len);
            struct iovec *body = req->iov;
            f.niov = vd_iov_skip_front(&body, req->nout, n->hdr_len);
            f.iov = body;
        }
        void *fault = NULL;
        struct rx_hold *hold = &n->hold[qp];
        if (n->p.backend == VD_NET_LOOPBACK)
            net_deliver(n, qp, &f, hold, &fault);
        else
            switch_forward(n, qp, &f, hold, &fault);
        if (fault) {
            net_release(hold);
            refault(fault); /* our own memory faulted: break this tx queue (worker's guard) */
        }
    }
    bump(&st->tx_frames, 1);
    bump(&st->tx_bytes, len);
    return 0;
}

/* Every request completes at once: frames are copied or written out here. */
int vd_net_handle(void *ctx, struct vd_req *req)
{
    req->used_len = handle(ctx, req, req->queue);
    return VD_REQ_DONE;
}

/* A tx batch ended (or broke): let go of the rx queue it delivered into. */
static void batch_done(void *ctx, struct vd_queue *q)
{
    vd_net *n = ctx;
    int qp = q->index / 2;
    if ((q->index & 1) && qp < n->p.nqp) {
        net_release(&n->hold[qp]);
        n->hold[qp].now = 0;
    }
}

/* A frame made by the daemon itself (e.g. the RARP announcement after
 * migration): out through the back-end, as if the guest had sent it. */
int vd_net_inject(vd_net *n, const void *frame, size_t len)
{
    if (len < ETH_HLEN || len > MAX_FRAME)
        return -EINVAL;
    struct iovec body = {(void *)frame, len};
    struct frame f = {.iov = &body, .niov = 1, .len = len};
    switch (n->p.backend) {
    case VD_NET_TAP: {
        uint8_t hdr[MAX_HDR] = {0};
        struct iovec iov[2] = {{hdr, n->hdr_len}, body};
        return tap_send(n, 0, iov, 2, n->hdr_len + len);
    }
    case VD_NET_LOOPBACK: /* the source is the daemon's: no source faults (NULL) */
        return net_deliver(n, 0, &f, NULL, NULL);
    case VD_NET_SWITCH:
        switch_forward(n, 0, &f, NULL, NULL);
        return 0;
    }
    return -EINVAL;
}

/* rx queue `queue` got buffers, or was enabled or disabled: a TAP may fill it. */
void vd_net_rx_kick(void *ctx, int queue)
{
    vd_net *n = ctx;
    int qp = queue / 2;
    if (n->p.backend != VD_NET_TAP || qp >= n->p.nqp)
        return;
    tap_rx_kick(n, qp);
}

/* ---------------------------------------------------------------- lifecycle */

vd_net *vd_net_new(const struct vd_net_params *p)
{
    if (p->nqp < 1 || p->nqp > VD_NET_MAX_QP)
        return NULL;
    vd_net *n = calloc(1, sizeof(*n));
    if (!n)
        return NULL;
    n->p = *p;
    memcpy(n->cfg_mac, p->mac, 6);
    n->hdr_len = MAX_HDR;
    n->active_pairs = 1;
    n->ctrl_queue = p->ctrl ? 2 * p->nqp : -1;
    for (int i = 0; i < VD_NET_MAX_QP; i++) {
        n->tap[i].fd = -1;
        pthread_mutex_init(&n->tap[i].lock, NULL);
    }
    return n;
}

void vd_net_set_features(vd_net *n, uint64_t features)
{
    n->features = features;
    n->hdr_len = (features & ((1ull << F_VERSION_1) | (1ull << F_MRG_RXBUF))) ? 12 : 10;
}

/* The device was reset (or its front-end went away): forget what the
 * driver set through the control queue. */
void vd_net_reset(vd_net *n)
{
    memcpy(n->p.mac, n->cfg_mac, 6);
    memset(n->rx_mode, 0, sizeof(n->rx_mode));
    n->active_pairs = 1;
    n->pairs_set = 0;
}

void vd_net_set_mtu(vd_net *n, uint32_t mtu)
{
    n->mtu = mtu;
}

/* The MAC address in config space: the configured one, or the driver's
 * VIRTIO_NET_CTRL_MAC_ADDR_SET (virtio 1.2 5.1.6.5.2). */
void vd_net_get_mac(vd_net *n, uint8_t *mac)
{
    memcpy(mac, n->p.mac, 6);
}

uint32_t vd_net_hdr_len(vd_net *n)
{
    return n->hdr_len;
}

/* Before the device's queues start (the handler sees batch_done set). */
int vd_net_start(vd_net *n, vd_device *dev)
{
    n->dev = dev;
    dev->batch_done = batch_done;
    return n->p.backend == VD_NET_TAP ? tap_start(n) : 0;
}

void vd_net_stop(vd_net *n)
{
    if (n->sw)
        vd_switch_detach(n->sw, n); /* (the control plane is the only writer of n->sw) */
    tap_stop(n);
}

void vd_net_free(vd_net *n)
{
    vd_net_stop(n);
    for (int i = 0; i < VD_NET_MAX_QP; i++) {
        pthread_mutex_destroy(&n->tap[i].lock);
        free(n->tap[i].buf);
    }
    free(n);
}

void vd_net_get_stats(vd_net *n, int qp, struct vd_net_stats *out)
{
    if (qp >= 0 && qp < VD_NET_MAX_QP)
        *out = n->st[qp];
}
