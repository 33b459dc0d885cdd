/* virtio-net device logic (virtio 1.2 section 5.1) and its back-ends.
 *
 * Queues: rx0, tx0, rx1, tx1, ..., then the control queue.  TX chains arrive
 * as requests (vd_net_handle); RX buffers are taken by the device when it has
 * a frame (deliver()).  Back-ends:
 *   tap       TX: writev of header + frame straight from guest memory; RX: a
 *             small pool of reader threads shared by every TAP queue of the
 *             daemon waits in epoll on the TAP fds and fills guest buffers
 *             (an idle TAP costs no thread and no wake-up).
 *   loopback  every TX frame is delivered to the same port's RX queue.
 *   switch    a learning L2 switch between ports of this daemon.
 * The virtio-net header travels with each frame (TAP understands it with
 * IFF_VNET_HDR), so checksum and GSO offloads pass through end to end.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "iov.h"
#include "vd.h"

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

#define ETH_HLEN 14
#define MAX_FRAME (65535 + ETH_HLEN) /* largest frame after the virtio-net header */
#define MAX_HDR 12
#define MAX_RX_BUFS 64              /* mergeable buffers one frame may take */
#define RX_IOV 256
#define TAP_BATCH 64

struct net_hdr {
    uint8_t flags, gso_type;
    uint16_t hdr_len, gso_size, csum_start, csum_offset, num_buffers;
} __attribute__((packed));

#define TAP_READERS 4         /* at most this many TAP reader threads (one per CPU) */

/* A TAP reader thread (see "tap readers" below). */
struct tap_reader {
    pthread_t thread;
    int epfd;
    int wake_fd;
    pthread_mutex_t lock;          /* protects the fields below */
    pthread_cond_t cond;
    int stop;
    uint64_t sync_req, sync_done;  /* quiescence handshake, see tap_reader_sync */
    uint8_t buf[MAX_HDR + MAX_FRAME];
};

/* One TAP queue: its fd waits in a reader's epoll set while `armed`, i.e.
 * unless the last batch found no guest buffer (then a kick of the rx queue
 * arms it again). */
struct tap_port {
    struct vd_net *net;
    int qp;
    int target; /* the rx pair this batch fills (tap_target) */
    int fd;
    int running;               /* registered with `reader` */
    struct tap_reader *reader;
    uint8_t *buf;              /* the reader's frame buffer, during a batch */
    pthread_mutex_t lock;      /* orders arming (tap_wake) against disarming (tap_service) */
    int armed;                 /* in the epoll set with EPOLLIN */
    int dead;                  /* the interface went away under us: never read again */
    uint64_t wakes;            /* bumped by tap_wake: a disarm decided before a wake is void */
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
    struct vd_net_stats st[VD_NET_MAX_QP];
};

/* ---------------------------------------------------------------- switch */

#define SW_MAX_PORTS 1024
#define FDB_SIZE 4096
#define FDB_PROBE 16
#define AGEING_NS (300ull * 1000000000ull)

struct fdb_entry {
    uint8_t mac[6];
    uint8_t used;
    int port;
    uint64_t seen;
};

struct vd_switch {
    pthread_rwlock_t ports_lock;
    struct vd_net *ports[SW_MAX_PORTS];
    int top;                      /* 1 + the highest port in use: floods look no further */
    pthread_mutex_t fdb_lock;
    struct fdb_entry fdb[FDB_SIZE];
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static unsigned mac_hash(const uint8_t *m)
{
    uint32_t h = 2166136261u;
    for (int i = 0; i < 6; i++)
        h = (h ^ m[i]) * 16777619u;
    return h % FDB_SIZE;
}

vd_switch *vd_switch_new(void)
{
    vd_switch *sw = calloc(1, sizeof(*sw));
    if (!sw)
        return NULL;
    pthread_rwlock_init(&sw->ports_lock, NULL);
    pthread_mutex_init(&sw->fdb_lock, NULL);
    return sw;
}

void vd_switch_free(vd_switch *sw)
{
    pthread_rwlock_destroy(&sw->ports_lock);
    pthread_mutex_destroy(&sw->fdb_lock);
    free(sw);
}

static void fdb_learn(vd_switch *sw, const uint8_t *mac, int port)
{
    unsigned h = mac_hash(mac);
    uint64_t t = now_ns();
    pthread_mutex_lock(&sw->fdb_lock);
    struct fdb_entry *victim = NULL;
    for (int i = 0; i < FDB_PROBE; i++) {
        struct fdb_entry *e = &sw->fdb[(h + i) % FDB_SIZE];
        if (e->used && !memcmp(e->mac, mac, 6)) {
            e->port = port;
            e->seen = t;
            pthread_mutex_unlock(&sw->fdb_lock);
            return;
        }
        if (!victim && (!e->used || t - e->seen > AGEING_NS))
            victim = e;
    }
    if (!victim) /* table region full: replace the oldest */
        for (int i = 0; i < FDB_PROBE; i++) {
            struct fdb_entry *e = &sw->fdb[(h + i) % FDB_SIZE];
            if (!victim || e->seen < victim->seen)
                victim = e;
        }
    memcpy(victim->mac, mac, 6);
    victim->used = 1;
    victim->port = port;
    victim->seen = t;
    pthread_mutex_unlock(&sw->fdb_lock);
}

static int fdb_lookup(vd_switch *sw, const uint8_t *mac)
{
    unsigned h = mac_hash(mac);
    uint64_t t = now_ns();
    int port = -1;
    pthread_mutex_lock(&sw->fdb_lock);
    for (int i = 0; i < FDB_PROBE; i++) {
        struct fdb_entry *e = &sw->fdb[(h + i) % FDB_SIZE];
        if (e->used && !memcmp(e->mac, mac, 6)) {
            if (t - e->seen <= AGEING_NS)
                port = e->port;
            break;
        }
    }
    pthread_mutex_unlock(&sw->fdb_lock);
    return port;
}

int vd_switch_attach(vd_switch *sw, vd_net *net)
{
    pthread_rwlock_wrlock(&sw->ports_lock);
    int port = -1;
    for (int i = 0; i < SW_MAX_PORTS && port < 0; i++)
        if (!sw->ports[i])
            port = i;
    if (port >= 0) {
        sw->ports[port] = net;
        net->sw = sw;
        net->sw_port = port;
        if (port >= sw->top)
            sw->top = port + 1;
    }
    pthread_rwlock_unlock(&sw->ports_lock);
    return port;
}

void vd_switch_detach(vd_switch *sw, vd_net *net)
{
    pthread_rwlock_wrlock(&sw->ports_lock);
    if (net->sw == sw && sw->ports[net->sw_port] == net)
        sw->ports[net->sw_port] = NULL;
    while (sw->top > 0 && !sw->ports[sw->top - 1])
        sw->top--;
    pthread_mutex_lock(&sw->fdb_lock);
    for (int i = 0; i < FDB_SIZE; i++)
        if (sw->fdb[i].used && sw->fdb[i].port == net->sw_port)
            sw->fdb[i].used = 0;
    pthread_mutex_unlock(&sw->fdb_lock);
    net->sw = NULL;
    pthread_rwlock_unlock(&sw->ports_lock);
}

/* ---------------------------------------------------------------- rx delivery */

/* A frame to deliver: its virtio-net header, then its bytes from an iovec list. */
struct frame {
    struct net_hdr hdr;
    const struct iovec *iov;
    int niov;
    uint64_t len; /* bytes after the header */
};

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

/* One frame going into one rx queue (deliver()); fill_buffers() runs under
 * a SIGBUS guard, so everything it must undo lives here. */
struct fill {
    vd_net *n;
    struct vd_queue *q;
    const struct frame *f;
    int locked;
    volatile int popped; /* buffers taken from the ring so far */
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
    uint16_t heads[MAX_RX_BUFS];
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
        if (__builtin_expect(q->dev->log_on, 0))
            vd_log_iov(q, q->dev->mem, in, req.nin, put);
        heads[nbufs] = req.head;
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
        vd_queue_push(q, heads[i], lens[i]);
    if (!c->locked)
        vd_queue_flush(q); /* a caller holding the lock flushes once per batch */
    return 0;
}

/* Fill rx buffers of queue pair qp with one frame.  Takes the rx queue lock
 * and publishes the used entries, unless `locked` (then the caller holds the
 * lock and calls vd_queue_flush after its batch).  Returns 0 if delivered,
 * -1 if dropped.
 *
 * The frame may come from another guest's memory (switch), so a SIGBUS
 * while copying is caught here, with the rx lock still to release: if the
 * fault is in this receiver's memory, its rx queue breaks; if it is in the
 * source's, the frame is dropped, *src_fault tells the caller where, and the
 * caller, once it holds no lock, touches that address again under its own
 * guard (which then breaks the sender's queue, not this one). */
static int deliver(vd_net *n, int qp, const struct frame *f, int locked, void **src_fault)
{
    struct vd_net_stats *st = &n->st[qp];
    if (!n->dev || !acceptable(n, &f->hdr)) {
        __atomic_add_fetch(&st->rx_dropped, 1, __ATOMIC_RELAXED);
        return -1;
    }
    struct vd_queue *q = &n->dev->q[2 * qp];
    if (!locked)
        pthread_mutex_lock(&q->lock);
    struct fill c = {.n = n, .q = q, .f = f, .locked = locked};
    void *addr = NULL;
    /* not ready: no driver (yet), or the queue broke: a drop like any other */
    int rc = vd_queue_ready(q) ? vd_try_guarded(fill_buffers, &c, &addr) : -1;
    if (rc == VD_FAULTED) {
        if (vd_mem_owns(n->dev->mem, addr) || !src_fault)
            vd_queue_fail(q, "queue %d: guest memory access faulted (SIGBUS): the front-end shrank shared memory",
                          q->index);
        else
            *src_fault = addr;
        rc = -1;
    }
    if (rc == 0) {
        __atomic_add_fetch(&st->rx_frames, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&st->rx_bytes, f->len, __ATOMIC_RELAXED);
    } else {
        vd_queue_unpop(q, c.popped);
        __atomic_add_fetch(&st->rx_dropped, 1, __ATOMIC_RELAXED);
    }
    if (!locked)
        pthread_mutex_unlock(&q->lock);
    return rc;
}

/* The source of a frame faulted inside deliver(): touch the address again,
 * now that no lock is held, so that the caller's guard breaks its queue.  (If
 * the memory is back, nothing happens and the frame is just lost.) */
static void refault(void *addr)
{
    if (addr)
        (void)*(volatile uint8_t *)addr;
}

/* ---------------------------------------------------------------- tap rx */

enum { RX_WAIT_BUFFERS, RX_FRAME, RX_DRAINED };

/* Which rx pair the frames read from TAP queue `qp` go to.  Its own pair
 * while the driver uses it; otherwise pair 0.  The kernel spreads flows over
 * every queue of a multiqueue TAP, and a driver may use fewer pairs than the
 * device has (VQ_PAIRS_SET, or a front-end such as QEMU that handles the
 * control queue itself and disables the vrings of the pairs not in use):
 * without this, the flows hashed to an unused queue would wait there for
 * good.  Reads the other queue's state without its lock: a stale answer
 * costs one more look (tap_service), never a frame. */
static int tap_target(vd_net *n, int qp)
{
    if (qp == 0)
        return 0;
    struct vd_queue *own = &n->dev->q[2 * qp];
    int in_use = __atomic_load_n(&own->started, __ATOMIC_RELAXED) &&
                 __atomic_load_n(&own->enabled, __ATOMIC_RELAXED) && !__atomic_load_n(&own->broken, __ATOMIC_RELAXED);
    if (__atomic_load_n(&n->pairs_set, __ATOMIC_RELAXED) && qp >= __atomic_load_n(&n->active_pairs, __ATOMIC_RELAXED))
        in_use = 0;
    return in_use ? qp : 0;
}

/* The rx pair port qp fills may take frames again (buffers added, pair
 * enabled or disabled, VQ_PAIRS_SET): read the TAP again. */
static void tap_wake(vd_net *n, int qp)
{
    struct tap_port *t = &n->tap[qp];
    if (!t->running)
        return;
    pthread_mutex_lock(&t->lock);
    t->wakes++;
    if (t->running && !t->armed && !t->dead) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = t};
        if (epoll_ctl(t->reader->epfd, EPOLL_CTL_MOD, t->fd, &ev) == 0)
            t->armed = 1;
    }
    pthread_mutex_unlock(&t->lock);
}

/* Move one frame from the TAP to the guest; q->lock held. */
static int tap_rx_one(struct tap_port *t, struct vd_queue *q)
{
    vd_net *n = t->net;
    if (!vd_queue_ready(q))
        return RX_WAIT_BUFFERS;
    /* Only read a frame when a buffer is there: the TAP queues for us meanwhile. */
    if (!vd_queue_has_avail(q) && !vd_queue_want_kick(q))
        return RX_WAIT_BUFFERS;
    ssize_t r = read(t->fd, t->buf, n->hdr_len + MAX_FRAME);
    if (r < 0)
        return RX_DRAINED; /* EAGAIN */
    if ((size_t)r < n->hdr_len + ETH_HLEN) {
        __atomic_add_fetch(&n->st[t->target].rx_dropped, 1, __ATOMIC_RELAXED);
        return RX_FRAME;
    }
    struct iovec body = {t->buf + n->hdr_len, r - n->hdr_len};
    struct frame f = {.iov = &body, .niov = 1, .len = r - n->hdr_len};
    memcpy(&f.hdr, t->buf, n->hdr_len < sizeof(f.hdr) ? n->hdr_len : sizeof(f.hdr));
    deliver(n, t->target, &f, 1, NULL); /* the source is our own buffer */
    return RX_FRAME;
}

/* Up to TAP_BATCH frames, then one used-ring update and at most one
 * interrupt.  Returns 1 to keep polling the TAP, 0 to wait for buffers. */
static int tap_rx_batch(void *arg)
{
    struct tap_port *t = arg;
    struct vd_queue *q = &t->net->dev->q[2 * t->target];
    int r = RX_FRAME;
    for (int i = 0; i < TAP_BATCH && r == RX_FRAME; i++)
        r = tap_rx_one(t, q);
    if (vd_queue_ready(q))
        vd_queue_flush(q);
    return r != RX_WAIT_BUFFERS;
}

/* ---------------------------------------------------------------- tap readers
 *
 * The daemon's TAP queues share a few reader threads (one per CPU, at most
 * TAP_READERS), created with the first TAP port and gone with the last:
 * a thread per TAP queue would make the thread count (and the memory of
 * their stacks) grow with the number of devices even when all are idle.
 * Each port stays with the reader it was given, so its frames keep their
 * order; a reader serves its ready ports one batch (TAP_BATCH frames) each
 * per round. */

static struct {
    pthread_mutex_t lock;          /* protects everything here */
    int ports;                     /* registered ports; the readers exist while > 0 */
    int n;
    unsigned next;
    struct tap_reader *r[TAP_READERS];
} tap_pool = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* One batch of port t; then disarm it if it waits for guest buffers. */
static void tap_service(struct tap_reader *r, struct tap_port *t, uint32_t events)
{
    vd_net *n = t->net;
    if (!(events & EPOLLIN)) {
        /* EPOLLERR/EPOLLHUP alone: the interface was deleted under us.  It
         * would be reported on every round (even disarmed), so drop it. */
        pthread_mutex_lock(&t->lock);
        epoll_ctl(r->epfd, EPOLL_CTL_DEL, t->fd, NULL);
        t->dead = 1;
        t->armed = 0;
        pthread_mutex_unlock(&t->lock);
        return;
    }
    uint64_t wakes = __atomic_load_n(&t->wakes, __ATOMIC_ACQUIRE);
    int target = tap_target(n, t->qp);
    struct vd_queue *q = &n->dev->q[2 * target];
    pthread_mutex_lock(&q->lock);
    t->target = target;
    t->buf = r->buf;
    int more = vd_run_guarded(q, tap_rx_batch, t);
    t->buf = NULL;
    pthread_mutex_unlock(&q->lock);
    if (more || tap_target(n, t->qp) != target)
        return; /* more frames, or the pair to fill changed meanwhile: look again next round */
    pthread_mutex_lock(&t->lock);
    if (t->wakes == wakes && t->armed) {
        /* No buffer: stop watching the TAP (level-triggered, it stays
         * readable) until tap_wake.  A wake since the batch began keeps it. */
        struct epoll_event ev = {.events = 0, .data.ptr = t};
        if (epoll_ctl(r->epfd, EPOLL_CTL_MOD, t->fd, &ev) == 0)
            t->armed = 0;
    }
    pthread_mutex_unlock(&t->lock);
}

static void *tap_reader_main(void *arg)
{
    struct tap_reader *r = arg;
    struct epoll_event ev[64];
    vd_block_signals();

    for (;;) {
        pthread_mutex_lock(&r->lock);
        uint64_t seen = r->sync_req;
        int stop = r->stop;
        int timeout = seen != r->sync_done ? 0 : -1; /* a sync request waits: finish this round */
        pthread_mutex_unlock(&r->lock);
        if (stop)
            break;
        int n = epoll_wait(r->epfd, ev, 64, timeout);
        for (int i = 0; i < n; i++) {
            if (ev[i].data.ptr == NULL) {
                uint64_t v;
                if (read(r->wake_fd, &v, sizeof(v)) < 0) {
                }
                continue;
            }
            tap_service(r, ev[i].data.ptr, ev[i].events);
        }
        pthread_mutex_lock(&r->lock);
        r->sync_done = seen;
        pthread_cond_broadcast(&r->cond);
        pthread_mutex_unlock(&r->lock);
    }
    return NULL;
}

static void tap_reader_kick(struct tap_reader *r)
{
    uint64_t one = 1;
    if (write(r->wake_fd, &one, sizeof(one)) < 0) {
    }
}

/* Wait until r has finished a round that began after this call: afterwards
 * it holds no port it got from epoll before (the caller removed it). */
static void tap_reader_sync(struct tap_reader *r)
{
    pthread_mutex_lock(&r->lock);
    uint64_t want = ++r->sync_req;
    pthread_mutex_unlock(&r->lock);
    tap_reader_kick(r);
    pthread_mutex_lock(&r->lock);
    while (r->sync_done < want)
        pthread_cond_wait(&r->cond, &r->lock);
    pthread_mutex_unlock(&r->lock);
}

static void tap_reader_free(struct tap_reader *r)
{
    pthread_mutex_lock(&r->lock);
    r->stop = 1;
    pthread_mutex_unlock(&r->lock);
    tap_reader_kick(r);
    pthread_join(r->thread, NULL);
    close(r->epfd);
    close(r->wake_fd);
    pthread_mutex_destroy(&r->lock);
    pthread_cond_destroy(&r->cond);
    free(r);
}

static struct tap_reader *tap_reader_new(int i)
{
    struct tap_reader *r = malloc(sizeof(*r)); /* the frame buffer is touched only when frames come */
    if (!r)
        return NULL;
    memset(r, 0, offsetof(struct tap_reader, buf));
    pthread_mutex_init(&r->lock, NULL);
    pthread_cond_init(&r->cond, NULL);
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    r->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (r->epfd < 0 || r->wake_fd < 0 || epoll_ctl(r->epfd, EPOLL_CTL_ADD, r->wake_fd, &ev) < 0 ||
        pthread_create(&r->thread, NULL, tap_reader_main, r) != 0) {
        if (r->epfd >= 0)
            close(r->epfd);
        if (r->wake_fd >= 0)
            close(r->wake_fd);
        free(r);
        return NULL;
    }
    char name[16];
    snprintf(name, sizeof(name), "vhostd-tap%d", i);
    pthread_setname_np(r->thread, name);
    return r;
}

/* Start reading port t's TAP (one more port for the pool). */
static int tap_port_register(struct tap_port *t)
{
    pthread_mutex_lock(&tap_pool.lock);
    if (tap_pool.n == 0) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        int want = cpus < 1 ? 1 : cpus > TAP_READERS ? TAP_READERS : (int)cpus;
        for (int i = 0; i < want; i++) {
            struct tap_reader *r = tap_reader_new(i);
            if (!r)
                break;
            tap_pool.r[tap_pool.n++] = r;
        }
        if (tap_pool.n == 0) {
            pthread_mutex_unlock(&tap_pool.lock);
            return -EAGAIN;
        }
    }
    struct tap_reader *r = tap_pool.r[tap_pool.next++ % tap_pool.n];
    t->reader = r;
    t->armed = 1;
    t->dead = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = t};
    int rc = epoll_ctl(r->epfd, EPOLL_CTL_ADD, t->fd, &ev) < 0 ? -errno : 0;
    if (rc == 0) {
        tap_pool.ports++;
        t->running = 1;
    }
    pthread_mutex_unlock(&tap_pool.lock);
    return rc;
}

/* Stop reading port t; the last port takes the readers with it. */
static void tap_port_unregister(struct tap_port *t)
{
    pthread_mutex_lock(&tap_pool.lock);
    pthread_mutex_lock(&t->lock);
    t->running = 0;
    if (!t->dead)
        epoll_ctl(t->reader->epfd, EPOLL_CTL_DEL, t->fd, NULL);
    t->armed = 0;
    pthread_mutex_unlock(&t->lock);
    tap_reader_sync(t->reader);
    t->reader = NULL;
    if (--tap_pool.ports == 0) {
        for (int i = 0; i < tap_pool.n; i++)
            tap_reader_free(tap_pool.r[i]);
        tap_pool.n = 0;
    }
    pthread_mutex_unlock(&tap_pool.lock);
}

/* rx queue `queue` got buffers, or was enabled or disabled: wake the TAP
 * readers that fill it, and its own (which may now fill another pair). */
void vd_net_rx_kick(void *ctx, int queue)
{
    vd_net *n = ctx;
    int qp = queue / 2;
    if (n->p.backend != VD_NET_TAP || qp >= n->p.nqp)
        return;
    for (int i = 0; i < n->p.nqp; i++)
        if (i == qp || tap_target(n, i) == qp)
            tap_wake(n, i);
}

/* ---------------------------------------------------------------- tx */

/* Forward a frame to the other ports of src's switch.  *src_fault: see deliver(). */
static void switch_forward(vd_net *src, int qp, const struct frame *f, void **src_fault)
{
    vd_switch *sw = src->sw;
    uint8_t eth[12];
    vd_iov_read(f->iov, f->niov, 0, eth, 12);
    const uint8_t *dst = eth, *from = eth + 6;
    if (!(from[0] & 1))
        fdb_learn(sw, from, src->sw_port);
    pthread_rwlock_rdlock(&sw->ports_lock);
    int port = (dst[0] & 1) ? -1 : fdb_lookup(sw, dst);
    if (port >= 0) {
        vd_net *to = sw->ports[port];
        if (to && port != src->sw_port) /* never back out of its source port */
            deliver(to, qp % (to->active_pairs ? to->active_pairs : 1), f, 0, src_fault);
    } else {
        for (int i = 0; i < sw->top && !(src_fault && *src_fault); i++) {
            vd_net *to = sw->ports[i];
            if (!to || i == src->sw_port)
                continue;
            int pair = qp % (to->active_pairs ? to->active_pairs : 1);
            if (!__atomic_load_n(&to->dev->q[2 * pair].started, __ATOMIC_RELAXED)) {
                /* No driver on that port (most ports of a big switch, most
                 * of the time): the drop deliver() would count, without
                 * taking its rx queue's lock.  A stale answer costs one
                 * frame, which flooding may always lose. */
                __atomic_add_fetch(&to->st[pair].rx_dropped, 1, __ATOMIC_RELAXED);
                continue;
            }
            deliver(to, pair, f, 0, src_fault);
        }
    }
    pthread_rwlock_unlock(&sw->ports_lock);
}

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
                if (n->p.backend == VD_NET_TAP) /* TAP readers of pairs now (un)used: look again */
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

static uint32_t handle(vd_net *n, struct vd_req *req, int queue)
{
    if (queue == n->ctrl_queue)
        return ctrl_handle(n, req);
    int qp = queue / 2;
    struct vd_net_stats *st = &n->st[qp];
    if (!(queue & 1) || qp >= n->p.nqp) /* rx queues are device-driven */
        return 0;
    if (req->out_bytes < n->hdr_len + ETH_HLEN || req->out_bytes > n->hdr_len + MAX_FRAME) {
        __atomic_add_fetch(&st->tx_bad, 1, __ATOMIC_RELAXED);
        return 0;
    }
    uint64_t len = req->out_bytes - n->hdr_len;
    switch (n->p.backend) {
    case VD_NET_TAP: {
        int cnt = req->nout < IOV_MAX ? req->nout : IOV_MAX;
        ssize_t w = writev(n->tap[qp].fd, req->iov, cnt);
        if (w != (ssize_t)req->out_bytes) {
            __atomic_add_fetch(&st->tx_dropped, 1, __ATOMIC_RELAXED);
            return 0;
        }
        break;
    }
    case VD_NET_LOOPBACK:
    case VD_NET_SWITCH: {
        struct frame f = {.len = len};
        vd_iov_read(req->iov, req->nout, 0, &f.hdr, n->hdr_len < sizeof(f.hdr) ? n->hdr_len : sizeof(f.hdr));
        struct iovec *body = req->iov;
        f.niov = vd_iov_skip_front(&body, req->nout, n->hdr_len);
        f.iov = body;
        void *fault = NULL;
        if (n->p.backend == VD_NET_LOOPBACK)
            deliver(n, qp, &f, 0, &fault);
        else if (n->sw)
            switch_forward(n, qp, &f, &fault);
        refault(fault); /* our own memory faulted: break this tx queue (worker's guard) */
        break;
    }
    }
    __atomic_add_fetch(&st->tx_frames, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&st->tx_bytes, len, __ATOMIC_RELAXED);
    return 0;
}

/* Every request completes at once: frames are copied or written out here. */
int vd_net_handle(void *ctx, struct vd_req *req)
{
    req->used_len = handle(ctx, req, req->queue);
    return VD_REQ_DONE;
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
        return writev(n->tap[0].fd, iov, 2) < 0 ? -errno : 0;
    }
    case VD_NET_LOOPBACK: /* the source is the daemon's: no source faults (NULL) */
        return deliver(n, 0, &f, 0, NULL);
    case VD_NET_SWITCH:
        if (n->sw)
            switch_forward(n, 0, &f, NULL);
        return 0;
    }
    return -EINVAL;
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

int vd_net_start(vd_net *n, vd_device *dev)
{
    n->dev = dev;
    if (n->p.backend != VD_NET_TAP)
        return 0;
    for (int i = 0; i < n->p.nqp; i++) {
        struct tap_port *t = &n->tap[i];
        t->net = n;
        t->qp = i;
        t->fd = n->p.tap_fds[i];
        int rc = tap_port_register(t);
        if (rc < 0)
            return rc;
    }
    return 0;
}

void vd_net_stop(vd_net *n)
{
    if (n->sw)
        vd_switch_detach(n->sw, n);
    for (int i = 0; i < VD_NET_MAX_QP; i++)
        if (n->tap[i].running)
            tap_port_unregister(&n->tap[i]);
}

void vd_net_free(vd_net *n)
{
    vd_net_stop(n);
    for (int i = 0; i < VD_NET_MAX_QP; i++)
        pthread_mutex_destroy(&n->tap[i].lock);
    free(n);
}

void vd_net_get_stats(vd_net *n, int qp, struct vd_net_stats *out)
{
    if (qp >= 0 && qp < VD_NET_MAX_QP)
        *out = n->st[qp];
}
