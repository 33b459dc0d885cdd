/* I/O engines: io_uring (per worker) and the thread pool.  See aio.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "aio.h"
#include "api.h"

#ifdef VD_HAVE_URING
#include <liburing.h>
#endif


/* Signals are Python's business (its handlers run on the main thread);
 * native threads keep only the synchronous faults. */
void vd_block_signals(void)
{
    sigset_t all;
    sigfillset(&all);
    sigdelset(&all, SIGBUS);
    sigdelset(&all, SIGSEGV);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
}

/* ---------------------------------------------------------------- running one operation */

int64_t vd_io_run(struct vd_io *io)
{
    ssize_t r;
    int cnt = io->niov < IOV_MAX ? io->niov : IOV_MAX;
    switch (io->sysop) {
    case VD_SYS_READV:
        r = preadv(io->fd, io->iov, cnt, (off_t)io->off);
        break;
    case VD_SYS_WRITEV:
        r = pwritev(io->fd, io->iov, cnt, (off_t)io->off);
        break;
    case VD_SYS_FDATASYNC:
        r = fdatasync(io->fd);
        break;
    case VD_SYS_FALLOCATE:
        r = fallocate(io->fd, io->mode, (off_t)io->off, (off_t)io->len);
        break;
    case VD_SYS_CALL:
        return io->call(io);
    default:
        return -EINVAL;
    }
    return r < 0 ? -errno : r;
}

/* A finished operation goes back to the worker that submitted it. */
void vd_aio_deliver(struct vd_io *io, int64_t res)
{
    struct vd_aio *a = io->aio;
    io->res = res;
    io->next = NULL;
    pthread_mutex_lock(&a->lock);
    int was_empty = a->done_head == NULL;
    if (a->done_tail)
        a->done_tail->next = io;
    else
        a->done_head = io;
    a->done_tail = io;
    pthread_mutex_unlock(&a->lock);
    /* The worker reads efd before it takes the list, so one write per
     * empty-to-non-empty transition is enough. */
    uint64_t one = 1;
    if (was_empty && write(a->efd, &one, sizeof(one)) < 0) {
    }
}

void vd_aio_deliver_local(struct vd_io *io, int64_t res)
{
    struct vd_aio *a = io->aio;
    io->res = res;
    io->next = NULL;
    if (a->local_tail)
        a->local_tail->next = io;
    else
        a->local_head = io;
    a->local_tail = io;
}

/* ---------------------------------------------------------------- thread pool */

#define POOL_IDLE_SECONDS 10

struct vd_threads {
    pthread_mutex_t lock;
    pthread_cond_t cond, gone;
    struct vd_io *head, *tail; /* runnable */
    int nthreads, idle, max, stop;
};

static void push(struct vd_io **head, struct vd_io **tail, struct vd_io *io)
{
    io->next = NULL;
    if (*tail)
        (*tail)->next = io;
    else
        *head = io;
    *tail = io;
}

static struct vd_io *pop(struct vd_io **head, struct vd_io **tail)
{
    struct vd_io *io = *head;
    if (io) {
        *head = io->next;
        if (!*head)
            *tail = NULL;
    }
    return io;
}

static void *pool_main(void *arg)
{
    struct vd_threads *t = arg;
    vd_block_signals();
    pthread_mutex_lock(&t->lock);
    for (;;) {
        struct vd_io *io = pop(&t->head, &t->tail);
        if (!io) {
            if (t->stop)
                break;
            struct timespec until;
            clock_gettime(CLOCK_REALTIME, &until);
            until.tv_sec += POOL_IDLE_SECONDS;
            t->idle++;
            int rc = pthread_cond_timedwait(&t->cond, &t->lock, &until);
            t->idle--;
            if (rc == ETIMEDOUT && !t->head)
                break; /* idle long enough: the pool shrinks back */
            continue;
        }
        pthread_mutex_unlock(&t->lock);
        int64_t res = vd_io_run(io);
        pthread_mutex_lock(&t->lock);
        struct vd_iolimit *lim = io->lim;
        if (lim) {
            lim->active--;
            struct vd_io *next = pop(&lim->head, &lim->tail);
            if (next) {
                lim->active++;
                push(&t->head, &t->tail, next);
            }
        }
        pthread_mutex_unlock(&t->lock);
        vd_aio_deliver(io, res);
        pthread_mutex_lock(&t->lock);
    }
    t->nthreads--;
    pthread_cond_broadcast(&t->gone);
    pthread_mutex_unlock(&t->lock);
    return NULL;
}

struct vd_threads *vd_threads_new(int max_threads)
{
    struct vd_threads *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    pthread_mutex_init(&t->lock, NULL);
    pthread_cond_init(&t->cond, NULL);
    pthread_cond_init(&t->gone, NULL);
    t->max = max_threads;
    return t;
}

/* Threads stuck in a hung file are left behind after a short wait: they
 * hold no memory of ours but the pool itself, which is then leaked. */
void vd_threads_free(struct vd_threads *t)
{
    pthread_mutex_lock(&t->lock);
    t->stop = 1;
    pthread_cond_broadcast(&t->cond);
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 1;
    while (t->nthreads && pthread_cond_timedwait(&t->gone, &t->lock, &until) != ETIMEDOUT) {
    }
    int left = t->nthreads;
    pthread_mutex_unlock(&t->lock);
    if (!left)
        free(t);
}

static void pool_submit(struct vd_threads *t, struct vd_io *io)
{
    pthread_mutex_lock(&t->lock);
    struct vd_iolimit *lim = io->lim;
    if (lim && lim->active >= lim->cap) {
        push(&lim->head, &lim->tail, io); /* its owner has enough threads busy */
    } else {
        if (lim)
            lim->active++;
        push(&t->head, &t->tail, io);
        if (t->idle) {
            pthread_cond_signal(&t->cond);
        } else if (t->nthreads < t->max) {
            pthread_t th;
            pthread_attr_t attr;
            pthread_attr_init(&attr);
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            pthread_attr_setstacksize(&attr, 256 * 1024);
            if (pthread_create(&th, &attr, pool_main, t) == 0) {
                t->nthreads++;
                pthread_setname_np(th, "vhostd-io");
            }
            pthread_attr_destroy(&attr);
        }
    }
    int stuck = t->nthreads == 0;
    pthread_mutex_unlock(&t->lock);
    if (stuck) {
        /* Not even one thread could be started: do it here rather than never. */
        pthread_mutex_lock(&t->lock);
        struct vd_io *mine = pop(&t->head, &t->tail);
        if (mine && mine->lim)
            mine->lim->active--;
        pthread_mutex_unlock(&t->lock);
        if (mine)
            vd_aio_deliver(mine, vd_io_run(mine));
    }
}

/* ---------------------------------------------------------------- io_uring */

#define URING_SQ 256
#define URING_CQ 4096


int vd_uring_available(char *why, size_t whylen)
{
#ifdef VD_HAVE_URING
    static int state; /* 0 unknown, 1 yes, -errno no */
    static char reason[128];
    static pthread_mutex_t once = PTHREAD_MUTEX_INITIALIZER;
    pthread_mutex_lock(&once);
    if (!state) {
        struct io_uring r;
        int rc = io_uring_queue_init(4, &r, 0);
        if (rc < 0) {
            state = rc;
            snprintf(reason, sizeof(reason), "io_uring_setup failed: %s", strerror(-rc));
        } else {
            struct io_uring_probe *p = io_uring_get_probe_ring(&r);
            static const int ops[] = {IORING_OP_READV, IORING_OP_WRITEV, IORING_OP_FSYNC, IORING_OP_FALLOCATE};
            state = 1;
            for (unsigned i = 0; i < sizeof(ops) / sizeof(ops[0]); i++) {
                if (!p || !io_uring_opcode_supported(p, ops[i])) {
                    state = -ENOSYS;
                    snprintf(reason, sizeof(reason), "the kernel's io_uring lacks opcode %d", ops[i]);
                    break;
                }
            }
            if (p)
                io_uring_free_probe(p);
            io_uring_queue_exit(&r);
        }
    }
    int ok = state == 1;
    if (!ok && why)
        snprintf(why, whylen, "%s", reason);
    pthread_mutex_unlock(&once);
    return ok;
#else
    if (why)
        snprintf(why, whylen, "vhostd was built without liburing");
    return 0;
#endif
}

int vd_aio_init(struct vd_aio *a, struct vd_threads *pool, int want_uring, char *why, size_t whylen)
{
    memset(a, 0, sizeof(*a));
    a->pool = pool;
    pthread_mutex_init(&a->lock, NULL);
    a->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (a->efd < 0) {
        snprintf(why, whylen, "eventfd: %s", strerror(errno));
        return -errno;
    }
#ifdef VD_HAVE_URING
    if (want_uring && vd_uring_available(why, whylen)) {
        struct io_uring *r = calloc(1, sizeof(*r));
        /* Newest kernels first: only this worker submits (SINGLE_ISSUER), and
         * completions wait for its next syscall instead of interrupting it
         * (COOP_TASKRUN; TASKRUN_FLAG tells liburing's peek to fetch them). */
        static const unsigned flags[] = {
            IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG |
                IORING_SETUP_SINGLE_ISSUER,
            IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL,
            IORING_SETUP_CQSIZE,
        };
        int rc = r ? -EINVAL : -ENOMEM;
        for (unsigned i = 0; rc == -EINVAL && i < sizeof(flags) / sizeof(flags[0]); i++) {
            struct io_uring_params p = {.flags = flags[i], .cq_entries = URING_CQ};
            rc = io_uring_queue_init_params(URING_SQ, r, &p);
        }
        if (rc == 0 && (rc = io_uring_register_eventfd(r, a->efd)) < 0)
            io_uring_queue_exit(r);
        if (rc == 0) {
            a->uring = r;
            a->has_uring = 1;
        } else {
            free(r);
            snprintf(why, whylen, "io_uring ring setup failed: %s", strerror(-rc));
        }
    }
#else
    (void)want_uring;
#endif
    return 0;
}

void vd_aio_destroy(struct vd_aio *a)
{
#ifdef VD_HAVE_URING
    if (a->uring) {
        io_uring_queue_exit(a->uring);
        free(a->uring);
        a->uring = NULL;
    }
#endif
    if (a->efd >= 0)
        close(a->efd);
    a->efd = -1;
    pthread_mutex_destroy(&a->lock);
}

void vd_aio_submit(struct vd_aio *a, struct vd_io *io)
{
    io->aio = a;
#ifdef VD_HAVE_URING
    if (a->has_uring && !io->threads && io->sysop != VD_SYS_CALL) {
        struct io_uring *r = a->uring;
        struct io_uring_sqe *sqe = io_uring_get_sqe(r);
        if (!sqe && io_uring_submit(r) >= 0) {
            a->unsubmitted = 0;
            sqe = io_uring_get_sqe(r);
        }
        if (sqe) {
            unsigned cnt = io->niov < IOV_MAX ? io->niov : IOV_MAX;
            switch (io->sysop) {
            case VD_SYS_READV:
                io_uring_prep_readv(sqe, io->fd, io->iov, cnt, io->off);
                break;
            case VD_SYS_WRITEV:
                io_uring_prep_writev(sqe, io->fd, io->iov, cnt, io->off);
                break;
            case VD_SYS_FDATASYNC:
                io_uring_prep_fsync(sqe, io->fd, IORING_FSYNC_DATASYNC);
                break;
            case VD_SYS_FALLOCATE:
                io_uring_prep_fallocate(sqe, io->fd, io->mode, io->off, io->len);
                break;
            }
            if (io->punt)
                sqe->flags |= IOSQE_ASYNC;
            io_uring_sqe_set_data(sqe, io);
            /* A worker with time to spare submits each I/O at once: bursts in
             * one submission reached this machine's (virtio) disk later than
             * the same I/Os one by one (4 KiB random reads at qd32, batches of
             * 1, 2, 4, 16 and unbounded: 83, 84, 78, 75, 65 k IOPS; qsd 80 k),
             * and adjacent ones get merged into fewer, larger requests.  A busy
             * worker submits at its flushes: fewer syscalls and device kicks. */
            a->unsubmitted++;
            if (!a->hold)
                vd_aio_flush(a);
            return;
        }
        /* The ring stays full: the pool takes it. */
    }
#endif
    pool_submit(a->pool, io);
}

int vd_aio_flush(struct vd_aio *a)
{
#ifdef VD_HAVE_URING
    if (a->unsubmitted) {
        int rc = io_uring_submit(a->uring);
        if (rc >= 0) {
            a->unsubmitted = (unsigned)rc >= a->unsubmitted ? 0 : a->unsubmitted - (unsigned)rc;
        } else if (rc == -EBUSY || rc == -EAGAIN || rc == -EINTR) {
            return 1; /* completions must be reaped first; try again next round */
        } else {
            /* Should not happen (bad ring state); the SQEs stay queued and are tried again. */
            return 1;
        }
    }
#else
    (void)a;
#endif
    return 0;
}

int vd_aio_reap(struct vd_aio *a, void (*cb)(struct vd_io *io, int64_t res, void *arg), void *arg)
{
    int n = 0;
#ifdef VD_HAVE_URING
    if (a->has_uring) {
        struct io_uring *r = a->uring;
        struct io_uring_cqe *cqe;
        /* peek also flushes completions the kernel kept back when the CQ was full */
        while (io_uring_peek_cqe(r, &cqe) == 0) {
            struct vd_io *io = io_uring_cqe_get_data(cqe);
            int64_t res = cqe->res;
            io_uring_cqe_seen(r, cqe); /* before cb: it may submit again */
            cb(io, res, arg);
            n++;
        }
    }
#endif
    while (a->local_head) { /* callbacks may deliver more */
        struct vd_io *list = a->local_head;
        a->local_head = a->local_tail = NULL;
        while (list) {
            struct vd_io *io = list;
            list = io->next;
            cb(io, io->res, arg);
            n++;
        }
    }
    if (__atomic_load_n(&a->done_head, __ATOMIC_RELAXED)) {
        pthread_mutex_lock(&a->lock);
        struct vd_io *list = a->done_head;
        a->done_head = a->done_tail = NULL;
        pthread_mutex_unlock(&a->lock);
        while (list) {
            struct vd_io *io = list;
            list = io->next;
            cb(io, io->res, arg);
            n++;
        }
    }
    return n;
}
