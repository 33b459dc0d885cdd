/* The TAP port of a net device: one TAP queue per queue pair.
 *
 * TX: writev of header + frame straight from guest memory (IFF_VNET_HDR).
 * RX: each TAP fd is an event source of the worker that serves its rx
 * queue (engine.c), so TAP queues share the workers and their poll loop
 * with every other queue: no thread of their own, and an idle TAP costs
 * nothing.  A batch reads up to TAP_BATCH frames into guest buffers; when
 * the guest has no buffer left the source stops waiting for EPOLLIN (the
 * TAP queues frames for us meanwhile) until the driver adds buffers and
 * kicks the rx queue (tap_rx_kick).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "net.h"

#define TAP_BATCH 64

enum { RX_WAIT_BUFFERS, RX_FRAME, RX_DRAINED };

int tap_send(vd_net *n, int qp, const struct iovec *iov, int niov, uint64_t bytes)
{
    int fd = n->tap[qp].fd;
    /* Most frames are one buffer (header and frame together): write() skips
     * importing an iovec array, ~4 % of a worker writing 64 B frames. */
    ssize_t w = niov == 1 ? write(fd, iov[0].iov_base, iov[0].iov_len)
                          : writev(fd, iov, niov < IOV_MAX ? niov : IOV_MAX);
    return w == (ssize_t)bytes ? 0 : -1;
}

/* Which rx pair the frames read from TAP queue `qp` go to.  Its own pair
 * while the driver uses it; otherwise pair 0.  The kernel spreads flows over
 * every queue of a multiqueue TAP, and a driver may use fewer pairs than the
 * device has (VQ_PAIRS_SET, or a front-end such as QEMU that handles the
 * control queue itself and disables the vrings of the pairs not in use):
 * without this, the flows hashed to an unused queue would wait there for
 * good.  Reads the other queue's state without its lock: a stale answer
 * costs one more look (tap_ready), never a frame. */
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

/* Arm or disarm t's source (t->lock held). */
static int tap_arm(struct tap_port *t, int on)
{
    if (vd_source_set(&t->src, t->fd, on ? EPOLLIN : 0) < 0)
        return -1;
    t->armed = on;
    return 0;
}

void tap_wake(vd_net *n, int qp)
{
    struct tap_port *t = &n->tap[qp];
    pthread_mutex_lock(&t->lock);
    t->wakes++;
    if (t->running && !t->armed && !t->dead)
        tap_arm(t, 1);
    pthread_mutex_unlock(&t->lock);
}

void tap_rx_kick(vd_net *n, int qp)
{
    for (int i = 0; i < n->p.nqp; i++)
        if (i == qp || tap_target(n, i) == qp)
            tap_wake(n, i);
}

/* Move one frame from the TAP to the guest; the rx queue is held. */
static int tap_rx_one(struct tap_port *t, struct vd_queue *q, struct rx_hold *hold)
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
    net_deliver(n, t->target, &f, hold, NULL); /* the source is our own buffer */
    return RX_FRAME;
}

struct batch {
    struct tap_port *t;
    struct rx_hold hold;
};

/* Up to TAP_BATCH frames.  Returns 1 to keep reading the TAP, 0 to wait
 * for buffers. */
static int tap_rx_batch(void *arg)
{
    struct batch *b = arg;
    int r = RX_FRAME;
    for (int i = 0; i < TAP_BATCH && r == RX_FRAME; i++)
        r = tap_rx_one(b->t, b->hold.q, &b->hold);
    return r != RX_WAIT_BUFFERS;
}

/* The TAP is readable (the worker's poll loop): one batch, then disarm if
 * the guest has no buffers. */
static void tap_ready(struct vd_source *src, uint32_t events)
{
    struct tap_port *t = (struct tap_port *)((char *)src - offsetof(struct tap_port, src));
    vd_net *n = t->net;
    if (!(events & EPOLLIN)) {
        /* EPOLLERR/EPOLLHUP alone: the interface was deleted under us.  It
         * would be reported on every round (even disarmed), so drop it. */
        pthread_mutex_lock(&t->lock);
        vd_source_set(src, -1, 0);
        t->dead = 1;
        t->armed = 0;
        pthread_mutex_unlock(&t->lock);
        return;
    }
    uint64_t wakes = __atomic_load_n(&t->wakes, __ATOMIC_ACQUIRE);
    int target = tap_target(n, t->qp);
    struct batch b = {.t = t, .hold = {.q = &n->dev->q[2 * target]}};
    pthread_mutex_lock(&b.hold.q->lock);
    b.hold.frames = 0;
    t->target = target;
    int more = vd_run_guarded(b.hold.q, tap_rx_batch, &b);
    net_release(&b.hold); /* publishes, one signal for the batch */
    if (more || tap_target(n, t->qp) != target)
        return; /* more frames, or the pair to fill changed meanwhile: look again next round */
    pthread_mutex_lock(&t->lock);
    /* No buffer: stop watching the TAP (level-triggered, it stays readable)
     * until tap_wake.  A wake since the batch began keeps it armed. */
    if (t->wakes == wakes && t->armed && t->running)
        tap_arm(t, 0);
    pthread_mutex_unlock(&t->lock);
}

int tap_start(vd_net *n)
{
    for (int i = 0; i < n->p.nqp; i++) {
        struct tap_port *t = &n->tap[i];
        t->net = n;
        t->qp = i;
        t->fd = n->p.tap_fds[i];
        if (!t->buf && !(t->buf = malloc(MAX_HDR + MAX_FRAME))) /* touched only when frames come */
            return -ENOMEM;
        t->src = (struct vd_source){.ready = tap_ready};
        pthread_mutex_lock(&t->lock);
        t->dead = 0;
        t->armed = 1;
        int rc = vd_source_add(n->dev->engine, vd_queue_worker(&n->dev->q[2 * i]), &t->src, t->fd, EPOLLIN);
        t->running = rc == 0;
        pthread_mutex_unlock(&t->lock);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Afterwards no worker touches a TAP queue of n (its fds may be closed). */
void tap_stop(vd_net *n)
{
    int stopped = 0;
    for (int i = 0; i < VD_NET_MAX_QP; i++) {
        struct tap_port *t = &n->tap[i];
        pthread_mutex_lock(&t->lock);
        if (t->running) {
            vd_source_remove(&t->src);
            t->running = 0;
            t->armed = 0;
            stopped = 1;
        }
        pthread_mutex_unlock(&t->lock);
    }
    if (stopped)
        vd_engine_sync(n->dev->engine); /* a batch running now ends; removed sources are gone */
}
