/* Worker threads and the queue lifecycle the control plane drives.
 *
 * A fixed pool of workers each waits in epoll on the kick eventfds of the
 * queues assigned to it (round robin) and on its I/O completions.  A kick
 * makes the owning worker take the queue lock and take requests off the
 * ring; requests whose I/O is pending are completed later by the same
 * worker when their I/O finishes (aio.c), and their used entries go out in
 * one batch per round.  No Python runs on this path.  The control plane
 * (Python, via cffi, GIL released) takes the same lock to change a queue,
 * so a queue is never reconfigured mid-batch; no lock is held while I/O is
 * in flight, so the control plane never waits for a disk.
 *
 * A round: kicked queues, then I/O (submit what the round prepared, reap
 * completions, publish them), then polled queues and the again list.
 *
 * A queue that used up its budget (VD_BUDGET requests) with more waiting
 * goes on the worker's again list: it is served again after the queues that
 * epoll reports, without a kick.
 *
 * Busy polling (a device's poll_us): sleeping in epoll and being woken by a
 * kick costs the driver a notification (a VM exit) and us a wake-up per
 * batch.  So a queue of such a device that ran empty keeps notifications
 * disabled and goes on the again list too; each round re-checks its avail
 * ring until poll_us passed without a request, then notifications are
 * enabled again (re-checked once more, against the lost wake-up) and the
 * queue waits for kicks as usual.  While the list is not empty the worker
 * does not block in epoll, so its other queues, its I/O completions and
 * vd_engine_sync are still served; an idle device costs nothing once its
 * window is over.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "vd.h"

struct vd_worker {
    pthread_t thread;
    int epfd;
    int wake_fd;
    struct vd_source wake_src, aio_src;
    int stop;
    struct vd_engine *engine;
    struct vd_aio aio;             /* the worker's own; set up on its thread */
    int ready;                     /* aio set up (under lock) */
    int io_retry;                  /* the kernel refused a submission: try again without sleeping */
    unsigned round_work;           /* requests finished this round (see io_round) */
    struct vd_queue *dirty;        /* queues with completions to publish; the worker's own */
    pthread_mutex_t lock;          /* protects the fields below */
    pthread_cond_t cond;
    uint64_t sync_req, sync_done;  /* quiescence handshake, see vd_engine_sync */
    struct vd_source *sources;     /* those added with vd_source_add (ticks, removal) */
    struct vd_queue *polled;       /* queues without a kick fd */
    struct vd_queue *again;        /* queues to look at without a kick (out of budget, or in a
                                      poll window); the worker's own, no lock */
};

struct vd_engine {
    int nworkers;
    unsigned next;
    struct vd_threads *pool;       /* shared by the workers (aio.c) */
    char uring_why[128];           /* why io_uring is not used, if it is not */
    struct vd_worker w[];
};

/* ---------------------------------------------------------------- workers */

/* Whether a queue that runs empty is busy-polled.  Queues without a kick fd
 * are looked at every round anyway, rx queues are driven by their device. */
static int spins(const struct vd_queue *q)
{
    return q->dev->poll_ns && !q->polled && !q->rx;
}

static int process(void *q)
{
    return vd_queue_process(q, spins(q));
}

static int process_guarded(struct vd_queue *q)
{
    return vd_run_guarded(q, process, q);
}

/* Put q on its worker's again list (q->lock held, called by q's worker),
 * opening or extending its poll window if it has one. */
static void come_back(struct vd_queue *q)
{
    q->spin_until = vd_now_ns() + q->dev->poll_ns;
    if (!q->again) {
        q->again = 1;
        q->again_next = q->worker->again;
        q->worker->again = q;
    }
}

/* ---- I/O completions */

static void device_destroy(struct vd_device *d);

/* The device's last orphan finished (no queue lock held): its queues may
 * take requests again, or, if it was freed meanwhile, it goes now. */
static void orphans_gone(struct vd_device *d)
{
    pthread_mutex_lock(&d->life);
    int left = __atomic_sub_fetch(&d->orphans, 1, __ATOMIC_RELAXED);
    int dying = d->dying;
    if (!left && !dying) {
        for (int i = 0; i < d->nqueues; i++)
            vd_queue_poke(d, i);
        /* The control plane may wait for this: a shared image's lock is
         * released only once no old write can land any more. */
        uint64_t one = 1;
        if (d->event_fd >= 0 && write(d->event_fd, &one, sizeof(one)) < 0) {
        }
    }
    pthread_mutex_unlock(&d->life);
    if (!left && dying)
        device_destroy(d);
}

struct reap {
    struct vd_worker *w;
    struct vd_queue *held; /* consecutive completions of one queue share its lock */
};

static void reap_unlock(struct reap *r)
{
    if (r->held) {
        pthread_mutex_unlock(&r->held->lock);
        r->held = NULL;
    }
}

static void on_io_done(struct vd_io *io, int64_t res, void *arg)
{
    struct reap *r = arg;
    struct vd_queue *q = vd_req_queue(io->req);
    if (q != r->held) {
        reap_unlock(r);
        pthread_mutex_lock(&q->lock);
        r->held = q;
    }
    if (vd_reqs_io_done(io, res)) {
        reap_unlock(r);
        orphans_gone(q->dev);
        return;
    }
    if (q->dirty == 1) {
        q->dirty = 2; /* on the list */
        q->dirty_next = r->w->dirty;
        r->w->dirty = q;
    }
    if (q->resume) {
        q->resume = 0;
        come_back(q);
    }
}

static int publish(void *q)
{
    struct vd_queue *queue = q;
    vd_ring_publish_used(queue, queue->dirty_from);
    return 0;
}

/* Submit what this round prepared, reap what finished, and make the
 * completions visible (one signal per queue). */
static void io_round(struct vd_worker *w)
{
    w->io_retry = vd_aio_flush(&w->aio);
    struct reap r = {w, NULL};
    int reaped = vd_aio_reap(&w->aio, on_io_done, &r);
    w->round_work += (unsigned)reaped;
    if (reaped)
        w->io_retry |= vd_aio_flush(&w->aio); /* completions may have submitted the next step */
    reap_unlock(&r);
    while (w->dirty) {
        struct vd_queue *q = w->dirty;
        pthread_mutex_lock(&q->lock);
        w->dirty = q->dirty_next;
        q->dirty_next = NULL;
        if (q->started && !q->broken)
            vd_run_guarded(q, publish, q);
        q->dirty = 0;
        pthread_mutex_unlock(&q->lock);
    }
}

struct again_arg {
    struct vd_queue *q;
    uint64_t now;
};

/* Look at a queue on the again list (q->lock held, guarded).  Returns 1 to
 * keep it there, 0 when it waits for kicks again. */
static int look_again(void *arg)
{
    struct again_arg *a = arg;
    struct vd_queue *q = a->q;
    if (!vd_queue_has_avail(q)) {
        if (a->now < q->spin_until)
            return 1;
        /* Window over (or none): enable notifications; requests that came
         * in meanwhile are served below (and open a new window). */
        if (!vd_queue_want_kick(q))
            return 0;
    }
    int r = vd_queue_process(q, spins(q));
    if (r == VD_QUIET)
        q->spin_until = vd_now_ns() + q->dev->poll_ns;
    return r != VD_IDLE && !q->broken;
}

/* Every queue on the again list, once. */
static void again_round(struct vd_worker *w, uint64_t now)
{
    struct vd_queue **pp = &w->again;
    while (*pp) {
        struct vd_queue *q = *pp;
        pthread_mutex_lock(&q->lock);
        /* A stopped queue is only dropped: its rings may be gone. */
        int keep = q->started && q->enabled && !q->broken && !q->rx && !q->polled;
        if (keep) {
            struct again_arg a = {q, now};
            uint64_t before = q->st.requests;
            keep = vd_run_guarded(q, look_again, &a);
            w->round_work += (unsigned)(q->st.requests - before);
        }
        if (keep) {
            pp = &q->again_next;
        } else {
            q->again = 0;
            *pp = q->again_next;
            q->again_next = NULL;
        }
        pthread_mutex_unlock(&q->lock);
    }
}

/* Go round the again list (and the I/O) for a short slice before the next
 * epoll_wait(0), a syscall, looks at the kicks of the other queues and at
 * sync requests. */
static void again_slice(struct vd_worker *w)
{
    uint64_t now = vd_now_ns(), end = now + VD_SPIN_SLICE_NS;
    while (w->again) {
        again_round(w, now);
        io_round(w);
        now = vd_now_ns();
        if (now >= end)
            break;
    }
}

static int quiet(void *q)
{
    vd_ring_notify_enable(q, 0);
    return 0;
}

/* Serve one queue; returns 1 if it has requests left over (budget spent). */
static int service(struct vd_queue *q, int kicked)
{
    int more = 0;
    pthread_mutex_lock(&q->lock);
    uint64_t before = q->st.requests;
    if (kicked && q->kick_fd >= 0) {
        uint64_t v;
        if (read(q->kick_fd, &v, sizeof(v)) == sizeof(v))
            q->st.kicks++;
    }
    int rx_kick = 0;
    if (q->started && q->enabled && !q->broken) {
        if (q->rx) {
            /* Buffers came: no more kicks for every refill.  The device asks
             * for one again (vd_queue_want_kick) when it runs out. */
            vd_run_guarded(q, quiet, q);
            rx_kick = 1;
        } else {
            int r = process_guarded(q);
            if (q->polled)
                more = r == VD_MORE; /* looked at every round anyway */
            else if (r != VD_IDLE)
                come_back(q); /* out of budget, or empty in a poll window */
        }
    }
    q->worker->round_work += (unsigned)(q->st.requests - before);
    pthread_mutex_unlock(&q->lock);
    if (rx_kick && q->dev->rx_kick)
        q->dev->rx_kick(q->dev->ctx, q->index); /* without q->lock: it may take it itself */
    return more;
}

/* ---- event sources */

static void wake(struct vd_worker *w);

#define container_of(p, type, member) ((type *)((char *)(p) - offsetof(type, member)))

static void wake_ready(struct vd_source *src, uint32_t events)
{
    uint64_t v;
    if (read(src->fd, &v, sizeof(v)) < 0) {
    }
}

static void aio_ready(struct vd_source *src, uint32_t events)
{
    uint64_t v;
    if (read(src->fd, &v, sizeof(v)) < 0) { /* then reap: see vd_aio_deliver in aio.c */
    }
}

static void kick_ready(struct vd_source *src, uint32_t events)
{
    service(container_of(src, struct vd_queue, kick_src), 1);
}

/* The epoll timeout (ms) that wakes the worker for its earliest deadline
 * (w->lock held). */
static int until_deadline(struct vd_worker *w, int timeout)
{
    uint64_t first = 0;
    for (struct vd_source *s = w->sources; s; s = s->next)
        if (!s->dead && s->deadline && (!first || s->deadline < first))
            first = s->deadline;
    if (!first || timeout == 0)
        return timeout;
    uint64_t now = vd_now_ns();
    int ms = first <= now ? 0 : (int)((first - now + 999999) / 1000000);
    return timeout < 0 || ms < timeout ? ms : timeout;
}

static void tick_sources(struct vd_worker *w)
{
    uint64_t now = vd_now_ns();
    pthread_mutex_lock(&w->lock);
    for (struct vd_source *s = w->sources; s; s = s->next)
        if (!s->dead && s->tick && s->deadline && s->deadline <= now)
            s->tick(s, now);
    pthread_mutex_unlock(&w->lock);
}

/* Removed sources go at the end of a round: this round's epoll events may
 * still have pointed at them. */
static void bury_sources(struct vd_worker *w)
{
    struct vd_source *dead = NULL;
    pthread_mutex_lock(&w->lock);
    for (struct vd_source **pp = &w->sources; *pp;) {
        struct vd_source *s = *pp;
        if (s->dead) {
            *pp = s->next;
            s->next = dead;
            dead = s;
        } else {
            pp = &s->next;
        }
    }
    pthread_mutex_unlock(&w->lock);
    while (dead) {
        struct vd_source *s = dead;
        dead = s->next;
        if (s->destroy)
            s->destroy(s);
    }
}

int vd_source_add(vd_engine *e, int worker, struct vd_source *src, int fd, uint32_t events)
{
    struct vd_worker *w = &e->w[worker % e->nworkers];
    src->worker = w;
    src->fd = -1;
    src->dead = 0;
    int rc = fd >= 0 ? vd_source_set(src, fd, events) : 0;
    if (rc)
        return rc;
    pthread_mutex_lock(&w->lock);
    src->next = w->sources;
    w->sources = src;
    pthread_mutex_unlock(&w->lock);
    wake(w); /* its deadline may be earlier than the worker's sleep */
    return 0;
}

int vd_source_set(struct vd_source *src, int fd, uint32_t events)
{
    struct vd_worker *w = src->worker;
    struct epoll_event ev = {.events = events, .data.ptr = src};
    if (fd != src->fd) {
        if (src->fd >= 0)
            epoll_ctl(w->epfd, EPOLL_CTL_DEL, src->fd, NULL);
        src->fd = -1;
        if (fd >= 0 && epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
            return -errno;
        src->fd = fd;
    } else if (fd >= 0 && events != src->events && epoll_ctl(w->epfd, EPOLL_CTL_MOD, fd, &ev) < 0) {
        return -errno;
    }
    src->events = events;
    return 0;
}

void vd_source_remove(struct vd_source *src)
{
    struct vd_worker *w = src->worker;
    pthread_mutex_lock(&w->lock);
    if (src->fd >= 0)
        epoll_ctl(w->epfd, EPOLL_CTL_DEL, src->fd, NULL);
    src->fd = -1;
    src->dead = 1;
    pthread_mutex_unlock(&w->lock);
    wake(w);
}

struct vd_aio *vd_engine_aio(vd_engine *e, int worker)
{
    return &e->w[worker % e->nworkers].aio;
}

int vd_queue_worker(const struct vd_queue *q)
{
    return (int)(q->worker - q->dev->engine->w);
}

int vd_engine_pick_worker(vd_engine *e)
{
    return (int)(e->next++ % (unsigned)e->nworkers);
}

static void *worker_main(void *arg)
{
    struct vd_worker *w = arg;
    struct epoll_event ev[64];

    vd_block_signals();
    /* The io_uring ring is made here: its submitter is this thread. */
    char why[128] = "";
    vd_aio_init(&w->aio, w->engine->pool, 1, why, sizeof(why));
    w->aio_src = (struct vd_source){.ready = aio_ready, .fd = w->aio.efd, .events = EPOLLIN, .worker = w};
    struct epoll_event aev = {.events = EPOLLIN, .data.ptr = &w->aio_src};
    if (w->aio.efd >= 0)
        epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->aio.efd, &aev);
    pthread_mutex_lock(&w->lock);
    if (!w->aio.has_uring && !w->engine->uring_why[0])
        snprintf(w->engine->uring_why, sizeof(w->engine->uring_why), "%s", why);
    w->ready = 1;
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->lock);

    int busy = 0; /* a polled queue has requests left over from the last round */
    for (;;) {
        pthread_mutex_lock(&w->lock);
        uint64_t seen = w->sync_req;
        int stop = w->stop;
        /* A sync request still unanswered: finish this round without sleeping. */
        int timeout = seen != w->sync_done || busy || w->again || w->io_retry ? 0 : w->polled ? 1 : -1;
        timeout = until_deadline(w, timeout);
        pthread_mutex_unlock(&w->lock);
        if (stop)
            break;
        int n = epoll_wait(w->epfd, ev, 64, timeout);
        for (int i = 0; i < n; i++) {
            struct vd_source *src = ev[i].data.ptr;
            if (!src->dead)
                src->ready(src, ev[i].events);
        }
        tick_sources(w);
        io_round(w);
        /* Polled queues: the lock-free peek at w->polled is re-read under lock. */
        pthread_mutex_lock(&w->lock);
        struct vd_queue *p = w->polled;
        pthread_mutex_unlock(&w->lock);
        busy = 0;
        for (; p; p = p->poll_next)
            busy |= service(p, 0);
        again_slice(w);
        io_round(w);
        /* A worker that finished many requests this round is busy: its next
         * round submits I/O only at its flushes, in bigger batches that cost
         * less CPU per I/O, leaving more of it to the other devices. */
        w->aio.hold = w->round_work >= VD_BUSY_ROUND;
        w->round_work = 0;
        bury_sources(w);
        pthread_mutex_lock(&w->lock);
        w->sync_done = seen;
        pthread_cond_broadcast(&w->cond);
        pthread_mutex_unlock(&w->lock);
    }
    vd_aio_destroy(&w->aio);
    return NULL;
}

static void wake(struct vd_worker *w)
{
    uint64_t one = 1;
    if (write(w->wake_fd, &one, sizeof(one)) < 0) {
    }
}

vd_engine *vd_engine_new(int nworkers)
{
    vd_guard_install();
    if (nworkers < 1)
        nworkers = 1;
    vd_engine *e = calloc(1, sizeof(*e) + nworkers * sizeof(struct vd_worker));
    if (!e)
        return NULL;
    e->nworkers = nworkers;
    e->pool = vd_threads_new(VD_POOL_THREADS);
    if (!e->pool) {
        free(e);
        return NULL;
    }
    for (int i = 0; i < nworkers; i++) {
        struct vd_worker *w = &e->w[i];
        w->engine = e;
        w->epfd = epoll_create1(EPOLL_CLOEXEC);
        w->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        pthread_mutex_init(&w->lock, NULL);
        pthread_cond_init(&w->cond, NULL);
        w->wake_src = (struct vd_source){.ready = wake_ready, .fd = w->wake_fd, .events = EPOLLIN, .worker = w};
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &w->wake_src};
        epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->wake_fd, &ev);
        pthread_create(&w->thread, NULL, worker_main, w);
        char name[16];
        snprintf(name, sizeof(name), "vhostd-w%d", i % 1000);
        pthread_setname_np(w->thread, name);
    }
    for (int i = 0; i < nworkers; i++) { /* devices may use their I/O contexts from now on */
        struct vd_worker *w = &e->w[i];
        pthread_mutex_lock(&w->lock);
        while (!w->ready)
            pthread_cond_wait(&w->cond, &w->lock);
        pthread_mutex_unlock(&w->lock);
    }
    return e;
}

int vd_engine_uring(vd_engine *e, char *why, size_t len)
{
    for (int i = 0; i < e->nworkers; i++)
        if (!e->w[i].aio.has_uring) {
            snprintf(why, len, "%s", e->uring_why[0] ? e->uring_why : "io_uring is unavailable");
            return 0;
        }
    return 1;
}

void vd_engine_free(vd_engine *e)
{
    for (int i = 0; i < e->nworkers; i++) {
        struct vd_worker *w = &e->w[i];
        pthread_mutex_lock(&w->lock);
        w->stop = 1;
        pthread_mutex_unlock(&w->lock);
        wake(w);
        pthread_join(w->thread, NULL);
        bury_sources(w); /* removed after its last round */
        close(w->epfd);
        close(w->wake_fd);
    }
    vd_threads_free(e->pool);
    free(e);
}

/* Wait until every worker has finished an epoll round that began after this
 * call: afterwards no worker holds a queue pointer it got before. */
void vd_engine_sync(vd_engine *e)
{
    for (int i = 0; i < e->nworkers; i++) {
        struct vd_worker *w = &e->w[i];
        pthread_mutex_lock(&w->lock);
        uint64_t want = ++w->sync_req;
        pthread_mutex_unlock(&w->lock);
        wake(w);
        pthread_mutex_lock(&w->lock);
        while (w->sync_done < want && !w->stop)
            pthread_cond_wait(&w->cond, &w->lock);
        pthread_mutex_unlock(&w->lock);
    }
}

/* ---------------------------------------------------------------- devices */

vd_device *vd_device_new(vd_engine *e, int nqueues, uint32_t max_queue_size, vd_handle_fn handle, void *ctx,
                         size_t req_priv, void (*release)(void *ctx), int event_fd, int worker)
{
    if (nqueues < 1 || nqueues > VD_MAX_QUEUES)
        return NULL;
    vd_device *d = calloc(1, sizeof(*d) + nqueues * sizeof(struct vd_queue));
    if (!d)
        return NULL;
    d->engine = e;
    d->nqueues = nqueues;
    d->max_queue_size = max_queue_size;
    d->handle = handle;
    d->ctx = ctx;
    d->req_priv = req_priv;
    d->release = release;
    d->event_fd = event_fd;
    d->log_fd = -1;
    pthread_mutex_init(&d->life, NULL);
    for (int i = 0; i < nqueues; i++) {
        struct vd_queue *q = &d->q[i];
        pthread_mutex_init(&q->lock, NULL);
        q->dev = d;
        q->index = i;
        q->kick_fd = q->call_fd = q->err_fd = -1;
        q->avail_wrap = q->used_wrap = 1;
        q->worker = worker >= 0 ? &e->w[worker % e->nworkers] : &e->w[e->next++ % e->nworkers];
        q->aio = &q->worker->aio;
        q->kick_src = (struct vd_source){.ready = kick_ready, .worker = q->worker};
    }
    return d;
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

static void poll_list_remove(struct vd_queue *q)
{
    struct vd_worker *w = q->worker;
    pthread_mutex_lock(&w->lock);
    for (struct vd_queue **pp = &w->polled; *pp; pp = &(*pp)->poll_next) {
        if (*pp == q) {
            *pp = q->poll_next;
            break;
        }
    }
    q->poll_next = NULL;
    pthread_mutex_unlock(&w->lock);
}

/* Detach the queue from its worker.  Caller must not hold q->lock. */
static void queue_detach(struct vd_queue *q)
{
    if (q->kick_fd >= 0)
        epoll_ctl(q->worker->epfd, EPOLL_CTL_DEL, q->kick_fd, NULL);
    if (q->polled)
        poll_list_remove(q);
}

/* Stop processing: afterwards the worker will not touch the ring.  Requests
 * still pending become orphans (see request.c); callers that must not leave
 * any drain the queue first (vd_queue_drain). */
static void queue_stop(struct vd_queue *q)
{
    queue_detach(q);
    pthread_mutex_lock(&q->lock);
    q->started = 0;
    q->polled = 0;
    q->desc = q->avail = q->used = NULL;
    /* Counted before the lock goes: the orphans' completions decrement it. */
    if (vd_reqs_stop(q))
        __atomic_add_fetch(&q->dev->orphans, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&q->lock);
}

static int queue_attach(struct vd_queue *q, char *err, size_t errlen)
{
    struct vd_worker *w = q->worker;
    if (q->kick_fd >= 0) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &q->kick_src};
        if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, q->kick_fd, &ev) < 0) {
            snprintf(err, errlen, "queue %d: cannot wait on the kick fd: %s", q->index, strerror(errno));
            return -errno;
        }
    } else {
        pthread_mutex_lock(&w->lock);
        q->poll_next = w->polled;
        w->polled = q;
        q->polled = 1;
        pthread_mutex_unlock(&w->lock);
        wake(w);
    }
    return 0;
}

/* Start the queue: translate rings, begin serving.  Caller must not hold q->lock. */
static int queue_start(struct vd_queue *q, char *err, size_t errlen)
{
    pthread_mutex_lock(&q->lock);
    int rc = vd_queue_translate(q, err, errlen);
    if (rc == 0)
        rc = vd_reqs_start(q, err, errlen);
    if (rc == 0) {
        q->event_idx = !!(q->dev->features & (1ull << VIRTIO_RING_F_EVENT_IDX));
        q->indirect = !!(q->dev->features & (1ull << VIRTIO_RING_F_INDIRECT_DESC));
        q->packed = !!(q->dev->features & (1ull << VIRTIO_F_RING_PACKED));
        q->used_puts = q->signalled_puts = 0;
        q->batch_open = 0;
        q->signalled_used = q->used_idx;
        q->signalled_wrap = q->used_wrap;
        q->fresh = 1;
        q->avail_known = 0;
        q->inflight_recover = q->inflight != NULL;
        q->nresubmit = q->resubmit_pos = 0;
        q->signalled_valid = 0;
        q->broken = 0;
        q->started = 1;
    }
    pthread_mutex_unlock(&q->lock);
    if (rc)
        return rc;
    rc = queue_attach(q, err, errlen);
    if (rc) {
        pthread_mutex_lock(&q->lock);
        q->started = 0;
        pthread_mutex_unlock(&q->lock);
        return rc;
    }
    vd_queue_poke(q->dev, q->index);
    return 0;
}

static struct vd_queue *queue_at(vd_device *d, int i)
{
    return (i >= 0 && i < d->nqueues) ? &d->q[i] : NULL;
}

#define QUEUE_OR_FAIL(q, d, i)                                                          \
    struct vd_queue *q = queue_at(d, i);                                                   \
    if (!q) {                                                                           \
        snprintf(err, errlen, "queue %d does not exist (device has %d)", i, d->nqueues); \
        return -EINVAL;                                                                 \
    }

int vd_queue_set_num(vd_device *d, int i, uint32_t num, char *err, size_t errlen)
{
    QUEUE_OR_FAIL(q, d, i);
    if (num == 0 || num > d->max_queue_size || (num & (num - 1))) {
        snprintf(err, errlen, "queue %d: size %u is not a power of two from 1 to %u", i, num, d->max_queue_size);
        return -EINVAL;
    }
    if (q->started) {
        snprintf(err, errlen, "queue %d: cannot resize a running queue", i);
        return -EBUSY;
    }
    q->num = num;
    /* A chain may be as long as the ring, or as long as the segments we advertise. */
    q->chain_limit = num > d->max_queue_size ? num : d->max_queue_size;
    if (q->chain_limit > VD_MAX_CHAIN)
        q->chain_limit = VD_MAX_CHAIN;
    return 0;
}

static int used_ring_fits(int index, uint32_t num, uint64_t used_gpa, uint64_t log_size, char *err, size_t errlen);

int vd_queue_set_addr(vd_device *d, int i, uint64_t desc, uint64_t used, uint64_t avail, uint32_t flags,
                      uint64_t log_gpa, char *err, size_t errlen)
{
    QUEUE_OR_FAIL(q, d, i);
    if (flags & ~VD_LOG_USED_FLAG) {
        snprintf(err, errlen, "queue %d: unknown ring address flags %#x", i, flags);
        return -EINVAL;
    }
    pthread_mutex_lock(&q->lock);
    int log_used = !!(flags & VD_LOG_USED_FLAG);
    int rc = log_used && d->log ? used_ring_fits(i, q->num, log_gpa, d->log_size, err, errlen) : 0;
    if (rc) {
        pthread_mutex_unlock(&q->lock);
        return rc;
    }
    q->desc_uva = desc;
    q->used_uva = used;
    q->avail_uva = avail;
    q->log_used = log_used;
    q->used_gpa = log_gpa;
    q->addr_set = 1;
    if (q->started)  /* Ring moved under a running queue (allowed by the spec): re-translate. */
        rc = vd_queue_translate(q, err, errlen);
    if (rc)
        q->started = 0;
    pthread_mutex_unlock(&q->lock);
    return rc;
}

/* Split: the next avail index (16 bits).  Packed: bits 0-14 the next
 * descriptor position, bit 15 its wrap counter; bits 16-30 and 31 the used
 * position and wrap counter when the front-end sends them (else the same). */
int vd_queue_set_base(vd_device *d, int i, uint32_t base, char *err, size_t errlen)
{
    QUEUE_OR_FAIL(q, d, i);
    if (q->started) {
        snprintf(err, errlen, "queue %d: cannot set the base of a running queue", i);
        return -EBUSY;
    }
    if (!(d->features & (1ull << VIRTIO_F_RING_PACKED))) {
        if (base > 0xffff) {
            snprintf(err, errlen, "queue %d: ring base %u does not fit 16 bits", i, base);
            return -EINVAL;
        }
        q->last_avail = q->used_idx = (uint16_t)base;
        q->avail_known = 0;
        return 0;
    }
    uint32_t used = base >> 16 ? base >> 16 : base & 0xffff;
    if ((base & 0x7fff) >= q->num || (used & 0x7fff) >= q->num) {
        snprintf(err, errlen, "queue %d: packed ring base %#x names a position beyond the ring size %u", i, base,
                 q->num);
        return -EINVAL;
    }
    q->last_avail = base & 0x7fff;
    q->avail_wrap = (base >> 15) & 1;
    q->used_idx = used & 0x7fff;
    q->used_wrap = (used >> 15) & 1;
    q->avail_known = 0;
    return 0;
}

/* GET_VRING_BASE, first half: take no new requests; the control plane
 * waits (without blocking) until vd_queue_pending is 0, then calls
 * vd_queue_get_base.  The device's event fd is written when it is. */
int vd_queue_drain(vd_device *d, int i, uint32_t *pending, char *err, size_t errlen)
{
    QUEUE_OR_FAIL(q, d, i);
    pthread_mutex_lock(&q->lock);
    q->draining = 1;
    *pending = vd_reqs_pending(q);
    pthread_mutex_unlock(&q->lock);
    return 0;
}

uint32_t vd_queue_pending(vd_device *d, int i)
{
    struct vd_queue *q = queue_at(d, i);
    if (!q)
        return 0;
    pthread_mutex_lock(&q->lock);
    uint32_t n = vd_reqs_pending(q);
    pthread_mutex_unlock(&q->lock);
    return n;
}

/* Completions may not be visible yet: their worker publishes them after
 * its reap round, which can end after the control plane stopped the queue
 * (e.g. their draining woke it for GET_VRING_BASE).  Before a stop the
 * front-end resumes from, publish them. */
static void publish_finished(struct vd_queue *q)
{
    pthread_mutex_lock(&q->lock);
    if (q->started && !q->broken && q->dirty)
        vd_run_guarded(q, publish, q);
    pthread_mutex_unlock(&q->lock);
}

int vd_queue_get_base(vd_device *d, int i, uint32_t *base, char *err, size_t errlen)
{
    QUEUE_OR_FAIL(q, d, i);
    publish_finished(q);
    queue_stop(q);
    close_fd(&q->kick_fd);
    if (q->packed)
        *base = q->last_avail | (uint32_t)q->avail_wrap << 15 | (uint32_t)q->used_idx << 16 |
                (uint32_t)q->used_wrap << 31;
    else
        *base = q->last_avail;
    return 0;
}

/* The queue an fd is handed to; with no such queue the fd is closed (we own it). */
static struct vd_queue *queue_for_fd(vd_device *d, int i, int fd, char *err, size_t errlen)
{
    struct vd_queue *q = queue_at(d, i);
    if (!q) {
        if (fd >= 0)
            close(fd);
        snprintf(err, errlen, "queue %d does not exist (device has %d)", i, d->nqueues);
    }
    return q;
}

int vd_queue_set_kick(vd_device *d, int i, int fd, char *err, size_t errlen)
{
    struct vd_queue *q = queue_for_fd(d, i, fd, err, errlen);
    if (!q)
        return -EINVAL;
    publish_finished(q); /* a restart re-reads the used index from the ring */
    queue_stop(q);
    close_fd(&q->kick_fd);
    q->kick_fd = fd;
    return queue_start(q, err, errlen);
}

static int set_fd(vd_device *d, int i, int fd, int which, char *err, size_t errlen)
{
    struct vd_queue *q = queue_for_fd(d, i, fd, err, errlen);
    if (!q)
        return -EINVAL;
    pthread_mutex_lock(&q->lock);
    int *slot = which ? &q->err_fd : &q->call_fd;
    close_fd(slot);
    *slot = fd;
    q->signalled_valid = 0;
    pthread_mutex_unlock(&q->lock);
    return 0;
}

int vd_queue_set_call(vd_device *d, int i, int fd, char *err, size_t errlen)
{
    return set_fd(d, i, fd, 0, err, errlen);
}

int vd_queue_set_err(vd_device *d, int i, int fd, char *err, size_t errlen)
{
    return set_fd(d, i, fd, 1, err, errlen);
}

int vd_queue_set_enable(vd_device *d, int i, int enable, char *err, size_t errlen)
{
    QUEUE_OR_FAIL(q, d, i);
    pthread_mutex_lock(&q->lock);
    q->enabled = enable;
    pthread_mutex_unlock(&q->lock);
    if (enable)
        vd_queue_poke(d, i);
    else if (q->rx && d->rx_kick)
        d->rx_kick(d->ctx, i); /* the device may move its rx work elsewhere */
    return 0;
}

/* Make the worker look at the queue soon (requests may be waiting). */
void vd_queue_poke(vd_device *d, int i)
{
    struct vd_queue *q = queue_at(d, i);
    if (!q)
        return;
    pthread_mutex_lock(&q->lock);
    if (q->started && q->kick_fd >= 0) {
        uint64_t one = 1;
        /* Writing to the kick eventfd wakes our own epoll like a driver kick. */
        if (write(q->kick_fd, &one, sizeof(one)) < 0) {
        }
    }
    pthread_mutex_unlock(&q->lock);
}

void vd_device_set_poll(vd_device *d, uint32_t poll_us)
{
    d->poll_ns = (uint64_t)poll_us * 1000; /* set before the queues start */
}

#define VHOST_F_LOG_ALL 26

static void lock_all(vd_device *d);

static void unlock_all(vd_device *d)
{
    for (int i = 0; i < d->nqueues; i++)
        pthread_mutex_unlock(&d->q[i].lock);
}

void vd_device_set_features(vd_device *d, uint64_t features)
{
    /* VHOST_F_LOG_ALL comes and goes while the queues run (a migration
     * starts or is cancelled): change log_on with no queue mid-batch. */
    lock_all(d);
    d->features = features;
    d->log_on = (features & (1ull << VHOST_F_LOG_ALL)) && d->log;
    unlock_all(d);
}

/* A used ring of num entries logged at used_gpa must end inside the log
 * (the spec: its last byte's bit falls within the log's size). */
static int used_ring_fits(int index, uint32_t num, uint64_t used_gpa, uint64_t log_size, char *err, size_t errlen)
{
    uint64_t end = used_gpa + 6ull + 8ull * (num ? num : VD_MAX_QUEUE_SIZE); /* flags, idx, ring, avail_event */
    if (end < used_gpa || (end - 1) / VD_LOG_PAGE / 8 >= log_size) {
        snprintf(err, errlen, "queue %d: its used ring at log address %#llx is beyond the dirty log of %llu bytes",
                 index, (unsigned long long)used_gpa, (unsigned long long)log_size);
        return -ERANGE;
    }
    return 0;
}

int vd_device_set_log(vd_device *d, void *base, uint64_t size, char *err, size_t errlen)
{
    if (base) {
        /* The log must cover guest memory from address 0 (vhost-user spec). */
        uint64_t end = vd_mem_end(d->mem);
        uint64_t need = (end + VD_LOG_PAGE * 8 - 1) / (VD_LOG_PAGE * 8);
        if (size < need) {
            snprintf(err, errlen, "dirty log of %llu bytes covers %#llx bytes of guest memory; the memory table "
                     "reaches %#llx (%llu bytes needed)", (unsigned long long)size,
                     (unsigned long long)(size * 8 * VD_LOG_PAGE), (unsigned long long)end, (unsigned long long)need);
            return -ERANGE;
        }
        for (int i = 0; i < d->nqueues; i++) {
            const struct vd_queue *q = &d->q[i];
            int rc = q->log_used ? used_ring_fits(i, q->num, q->used_gpa, size, err, errlen) : 0;
            if (rc)
                return rc;
        }
    }
    lock_all(d);
    d->log = base;
    d->log_size = base ? size : 0;
    d->log_on = (d->features & (1ull << VHOST_F_LOG_ALL)) && d->log;
    unlock_all(d);
    return 0;
}

void vd_device_set_log_fd(vd_device *d, int fd)
{
    lock_all(d);
    int old = d->log_fd;
    d->log_fd = fd;
    unlock_all(d);
    if (old >= 0)
        close(old);
}

/* Memory changes pause every queue: lock all, change, re-translate, unlock. */
/* Lock order: request queues before device-driven (rx) queues, because a
 * worker serving a request queue may deliver into an rx queue (net switch,
 * loopback) while holding its own lock. */
static void lock_all(vd_device *d)
{
    for (int rx = 0; rx < 2; rx++)
        for (int i = 0; i < d->nqueues; i++)
            if (d->q[i].rx == rx)
                pthread_mutex_lock(&d->q[i].lock);
}

void vd_device_set_rx_queues(vd_device *d, uint64_t mask, void (*rx_kick)(void *ctx, int queue))
{
    for (int i = 0; i < d->nqueues; i++)
        d->q[i].rx = !!(mask & (1ull << i));
    d->rx_kick = rx_kick;
}

static void unlock_all_retranslate(vd_device *d)
{
    for (int i = 0; i < d->nqueues; i++) {
        struct vd_queue *q = &d->q[i];
        if (q->started) {
            char err[VD_ERRMSG];
            if (vd_queue_translate(q, err, sizeof(err)) < 0)
                vd_queue_fail(q, "%s (after a memory table change)", err);
        }
        pthread_mutex_unlock(&q->lock);
    }
}

/* Swap in a new table: queues pause (all locks), re-translate their rings;
 * pending requests keep the old table until they complete. */
static void swap_table(vd_device *d, struct vd_mem *fresh)
{
    lock_all(d);
    vd_reqs_mem_swap(d, fresh);
    unlock_all_retranslate(d);
}

int vd_mem_set_table(vd_device *d, int n, const struct vd_region_desc *regions, const int *fds, char *err,
                     size_t errlen)
{
    struct vd_mem *fresh = NULL;
    int rc = vd_mem_build(&fresh, n, regions, fds, err, errlen);
    for (int i = 0; i < n; i++)
        close(fds[i]);
    if (rc == 0)
        swap_table(d, fresh);
    return rc;
}

/* ADD_MEM_REG and REM_MEM_REG come from the control plane one at a time, so
 * d->mem cannot change between reading it and swapping. */
int vd_mem_add_region(vd_device *d, const struct vd_region_desc *region, int fd, char *err, size_t errlen)
{
    struct vd_mem *fresh = NULL;
    int rc = vd_mem_with(&fresh, d->mem, region, fd, err, errlen);
    close(fd);
    if (rc == 0)
        swap_table(d, fresh);
    return rc;
}

int vd_mem_remove_region(vd_device *d, const struct vd_region_desc *region, char *err, size_t errlen)
{
    struct vd_mem *fresh = NULL;
    int rc = vd_mem_without(&fresh, d->mem, region, err, errlen);
    if (rc == 0)
        swap_table(d, fresh);
    return rc;
}

void vd_device_reset(vd_device *d)
{
    for (int i = 0; i < d->nqueues; i++) {
        struct vd_queue *q = &d->q[i];
        queue_stop(q);
        pthread_mutex_lock(&q->lock);
        close_fd(&q->kick_fd);
        close_fd(&q->call_fd);
        close_fd(&q->err_fd);
        q->num = 0;
        q->addr_set = 0;
        q->enabled = 0;
        q->broken = 0;
        /* error_pending survives: a queue that broke just before the reset
         * (e.g. the guest's last kick raced the disconnect) must still be
         * reported; the control plane collects it right after the reset. */
        q->last_avail = q->used_idx = 0;
        q->avail_wrap = q->used_wrap = 1; /* 2.8.1: both start at 1 */
        q->avail_known = 0;
        pthread_mutex_unlock(&q->lock);
    }
    d->needs_reset = 0;
    lock_all(d);
    d->features = 0;
    d->log_on = 0;
    for (int i = 0; i < d->nqueues; i++)
        d->q[i].log_used = 0;
    unlock_all(d);
}

void vd_device_clear_memory(vd_device *d)
{
    swap_table(d, NULL);
}

/* The device is gone and none of its I/O is pending: free it and let the
 * device model go (e.g. close its image). */
static void device_destroy(struct vd_device *d)
{
    for (int i = 0; i < d->nqueues; i++) {
        vd_reqs_free(&d->q[i]);
        pthread_mutex_destroy(&d->q[i].lock);
    }
    vd_mem_put(d->mem);
    if (d->log_fd >= 0)
        close(d->log_fd);
    pthread_mutex_destroy(&d->life);
    if (d->release)
        d->release(d->ctx);
    free(d);
}

/* With orphans in flight (a disk that hangs) the device lives on until the
 * last one finishes; the worker reaping it frees it then.  Either way the
 * caller is done with d and must not touch ctx any more. */
void vd_device_free(vd_device *d)
{
    vd_device_reset(d);
    vd_engine_sync(d->engine);
    pthread_mutex_lock(&d->life);
    d->dying = 1;
    d->event_fd = -1; /* the control plane closes it */
    int now = d->orphans == 0;
    pthread_mutex_unlock(&d->life);
    if (now)
        device_destroy(d);
}

int vd_device_needs_reset(vd_device *d)
{
    return d->needs_reset;
}

int vd_device_take_error(vd_device *d, char *buf, size_t len)
{
    for (int i = 0; i < d->nqueues; i++) {
        struct vd_queue *q = &d->q[i];
        pthread_mutex_lock(&q->lock);
        int pending = q->error_pending;
        if (pending) {
            snprintf(buf, len, "%s", q->errmsg);
            q->error_pending = 0;
        }
        pthread_mutex_unlock(&q->lock);
        if (pending)
            return i;
    }
    return -1;
}

int vd_device_take_redo(vd_device *d, int *count)
{
    for (int i = 0; i < d->nqueues; i++) {
        struct vd_queue *q = &d->q[i];
        pthread_mutex_lock(&q->lock);
        int n = q->redo_noted;
        q->redo_noted = 0;
        pthread_mutex_unlock(&q->lock);
        if (n) {
            *count = n;
            return i;
        }
    }
    return -1;
}

/* Break queue i from the control plane (e.g. its image is locked by another
 * user): NEEDS_RESET, the err fd and the event fd, like a bad ring. */
int vd_device_fail(vd_device *d, int i, const char *msg, char *err, size_t errlen)
{
    QUEUE_OR_FAIL(q, d, i);
    pthread_mutex_lock(&q->lock);
    vd_queue_fail(q, "%s", msg);
    pthread_mutex_unlock(&q->lock);
    return 0;
}

int vd_device_orphans(vd_device *d)
{
    return __atomic_load_n(&d->orphans, __ATOMIC_RELAXED);
}

int vd_queue_set_inflight(vd_device *d, int i, void *region, uint32_t queue_size, char *err, size_t errlen)
{
    struct vd_queue *q = queue_at(d, i);
    if (!q) {
        snprintf(err, errlen, "queue %d does not exist", i);
        return -EINVAL;
    }
    pthread_mutex_lock(&q->lock);
    q->inflight = region;
    q->inflight_size = queue_size;
    q->inflight_recover = region != NULL;
    q->nresubmit = q->resubmit_pos = 0;
    pthread_mutex_unlock(&q->lock);
    return 0;
}

void vd_device_set_timing(vd_device *d, int on)
{
    __atomic_store_n(&d->timing, on, __ATOMIC_RELAXED);
}

int vd_queue_get_latency(vd_device *d, int i, uint64_t *buckets, uint64_t *sum_ns)
{
    struct vd_queue *q = queue_at(d, i);
    if (!q)
        return -EINVAL;
    pthread_mutex_lock(&q->lock);
    memcpy(buckets, q->st.lat, sizeof(q->st.lat));
    *sum_ns = q->st.lat_sum_ns;
    pthread_mutex_unlock(&q->lock);
    return 0;
}

int vd_queue_get_stats(vd_device *d, int i, struct vd_queue_info *out)
{
    struct vd_queue *q = queue_at(d, i);
    if (!q)
        return -EINVAL;
    pthread_mutex_lock(&q->lock);
    out->num = q->num;
    out->started = q->started;
    out->enabled = q->enabled;
    out->broken = q->broken;
    out->polled = q->polled;
    out->packed = q->packed;
    out->last_avail = q->last_avail;
    out->used_idx = q->used_idx;
    out->driver_avail = q->started ? vd_ring_driver_avail(q) : 0;
    out->requests = q->st.requests;
    out->kicks = q->st.kicks;
    out->notifies = q->st.notifies;
    out->out_bytes = q->st.out_bytes;
    out->in_bytes = q->st.in_bytes;
    out->pending = vd_reqs_pending(q);
    pthread_mutex_unlock(&q->lock);
    return 0;
}
