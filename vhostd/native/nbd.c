/* The NBD store: an export of an NBD server (nbdkit, qemu-nbd, a storage
 * appliance) through libnbd's asynchronous API.
 *
 * Its connections (one, or several when the server allows multi-conn)
 * belong to one worker: their fds are sources in that worker's epoll and
 * the device's queues run on the same worker, so submitting, libnbd's state
 * machines and the completions are all that worker's, without a lock.
 *
 * Failures are the normal case on a network.  A connection that dies is
 * made again with back-off (0.1 s, doubling, up to reconnect_delay);
 * operations that were in flight on it, or start meanwhile, wait and are
 * issued again once a connection is back (reads, writes, flushes, trims and
 * zeroes may all be repeated).  One that has waited io_timeout fails with
 * ETIMEDOUT (the guest sees an I/O error).  A connection whose server
 * stopped answering (its oldest operation is older than io_timeout) is
 * dropped and made again.  Every change of state is one line in the log.
 *
 * Built without libnbd, it only says so.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>

#include "api.h"
#include "store.h"
#include "vd.h"

#ifdef VD_HAVE_NBD
#include <libnbd.h>

#define BACKOFF_FIRST_NS 100000000ull /* 0.1 s */
#define MAX_LEN (32u << 20)           /* a read or write moves at most this much in one command */

enum { C_DOWN, C_CONNECTING, C_READY };

struct nbd_store;

struct conn {
    struct vd_source src;
    struct nbd_store *st;
    int index;
    struct nbd_handle *h;
    int state;
    uint64_t retry_at, backoff_ns;
    uint64_t connect_deadline;
    struct vd_io *issued, *issued_tail; /* oldest first */
    char why[160];                      /* why it went down */
};

struct nbd_store {
    struct vd_store s;
    struct vd_nbd_params p;
    struct conn conn[VD_NBD_MAX_CONN];
    int nconn;
    int64_t size;
    int readonly, can_flush, can_trim, can_zero, multi_conn;
    uint32_t block_min;
    struct vd_io *waiting, *waiting_tail; /* for a connection, oldest first */
    unsigned next_conn;
    int attached, alive;                /* connections that are worker sources; not yet destroyed */
    /* for vhostd status: written by the worker, read by the control plane */
    int ready_conns;
    uint64_t reconnects, timeouts;
};

static void push(struct vd_io **head, struct vd_io **tail, struct vd_io *io)
{
    io->s_prev = *tail;
    io->s_next = NULL;
    if (*tail)
        (*tail)->s_next = io;
    else
        *head = io;
    *tail = io;
}

static void unlink_io(struct vd_io **head, struct vd_io **tail, struct vd_io *io)
{
    if (io->s_prev)
        io->s_prev->s_next = io->s_next;
    else
        *head = io->s_next;
    if (io->s_next)
        io->s_next->s_prev = io->s_prev;
    else
        *tail = io->s_prev;
    io->s_prev = io->s_next = NULL;
}

static int timed_out(const struct nbd_store *st, const struct vd_io *io, uint64_t now)
{
    return st->p.io_timeout_ms && now - io->since >= (uint64_t)st->p.io_timeout_ms * 1000000ull;
}

/* An operation the store gives up on (or finished): back to its request. */
static void finish(struct vd_io *io, int64_t res)
{
    io->conn = NULL;
    vd_aio_deliver_local(io, res);
}

static void update_events(struct conn *c)
{
    unsigned dir = nbd_aio_get_direction(c->h);
    uint32_t ev = (dir & LIBNBD_AIO_DIRECTION_READ ? EPOLLIN : 0) | (dir & LIBNBD_AIO_DIRECTION_WRITE ? EPOLLOUT : 0);
    vd_source_set(&c->src, nbd_aio_get_fd(c->h), ev | EPOLLIN);
}

static int is_transport_error(int e)
{
    return e == ENOTCONN || e == ECONNRESET || e == EPIPE || e == ESHUTDOWN || e == ECONNABORTED;
}

/* libnbd's completion of a command (on the worker, inside a notify). */
static int command_done(void *user_data, int *error)
{
    struct vd_io *io = user_data;
    struct conn *c = io->conn;
    struct nbd_store *st = c->st;
    unlink_io(&c->issued, &c->issued_tail, io);
    if (*error && is_transport_error(*error)) {
        io->conn = NULL;
        push(&st->waiting, &st->waiting_tail, io); /* the connection is going: again on the next one */
        return 1;
    }
    finish(io, *error ? -*error : (int64_t)io->moved);
    return 1;
}

static int issue(struct conn *c, struct vd_io *io)
{
    nbd_completion_callback cb = {.callback = command_done, .user_data = io};
    int64_t cookie = -1;
    io->moved = 0;
    switch (io->op) {
    case VD_IO_READ:
    case VD_IO_WRITE:
        io->moved = io->iov[0].iov_len < MAX_LEN ? io->iov[0].iov_len : MAX_LEN;
        cookie = io->op == VD_IO_READ ? nbd_aio_pread(c->h, io->iov[0].iov_base, io->moved, io->off, cb, 0)
                                      : nbd_aio_pwrite(c->h, io->iov[0].iov_base, io->moved, io->off, cb, 0);
        break;
    case VD_IO_FLUSH:
        cookie = nbd_aio_flush(c->h, cb, 0);
        break;
    case VD_IO_DISCARD:
        cookie = nbd_aio_trim(c->h, io->len, io->off, cb, 0);
        break;
    case VD_IO_ZERO:
        cookie = nbd_aio_zero(c->h, io->len, io->off, cb, io->unmap ? 0 : LIBNBD_CMD_FLAG_NO_HOLE);
        break;
    default:
        errno = EINVAL;
    }
    if (cookie < 0)
        return -(nbd_get_errno() ? nbd_get_errno() : EIO);
    io->conn = c;
    push(&c->issued, &c->issued_tail, io);
    return 0;
}

static struct conn *ready_conn(struct nbd_store *st)
{
    for (int i = 0; i < st->nconn; i++) {
        struct conn *c = &st->conn[st->next_conn++ % st->nconn];
        if (c->state == C_READY)
            return c;
    }
    return NULL;
}

static void conn_schedule(struct conn *c);

/* Issue what waits, while a connection is ready. */
static void issue_waiting(struct nbd_store *st)
{
    struct conn *c;
    while (st->waiting && (c = ready_conn(st))) {
        struct vd_io *io = st->waiting;
        unlink_io(&st->waiting, &st->waiting_tail, io);
        int rc = issue(c, io);
        if (rc == 0) {
            update_events(c);
        } else if (is_transport_error(-rc)) {
            push(&st->waiting, &st->waiting_tail, io);
            break; /* the connection noticed it is gone: its source will say so */
        } else {
            finish(io, rc);
        }
    }
}

static void conn_down(struct conn *c, const char *why)
{
    struct nbd_store *st = c->st;
    int was_ready = c->state == C_READY;
    /* What libnbd did not retire (closing runs no completion callback) waits for the next connection. */
    while (c->issued) {
        struct vd_io *io = c->issued;
        unlink_io(&c->issued, &c->issued_tail, io);
        io->conn = NULL;
        push(&st->waiting, &st->waiting_tail, io);
    }
    vd_source_set(&c->src, -1, 0);
    nbd_close(c->h);
    c->h = NULL;
    if (was_ready) {
        __atomic_sub_fetch(&st->ready_conns, 1, __ATOMIC_RELAXED);
        vd_store_note(&st->s, 1, "connection %d to %s lost: %s; reconnecting", c->index, st->p.uri, why);
    } else if (strcmp(c->why, why) != 0) {
        vd_store_note(&st->s, 1, "connection %d to %s failed: %s; retrying", c->index, st->p.uri, why);
    }
    snprintf(c->why, sizeof(c->why), "%s", why);
    c->state = C_DOWN;
    c->backoff_ns = c->backoff_ns ? c->backoff_ns * 2 : BACKOFF_FIRST_NS;
    uint64_t max = (uint64_t)st->p.reconnect_delay_ms * 1000000ull;
    if (c->backoff_ns > max)
        c->backoff_ns = max ? max : BACKOFF_FIRST_NS;
    c->retry_at = vd_now_ns() + c->backoff_ns;
    conn_schedule(c);
    issue_waiting(st); /* on another connection, if one is up */
}

/* The server's answers may differ after a reconnect (it restarted with
 * another export): the disk must not change under the guest. */
static int same_export(struct conn *c, char *why, size_t len)
{
    struct nbd_store *st = c->st;
    int64_t size = nbd_get_size(c->h);
    if (size != st->size) {
        snprintf(why, len, "the export is now %lld bytes, not %lld", (long long)size, (long long)st->size);
        return 0;
    }
    if (nbd_is_read_only(c->h) > st->readonly) {
        snprintf(why, len, "the export is read-only now");
        return 0;
    }
    return 1;
}

/* After libnbd progressed: what state is the connection in now? */
static void conn_look(struct conn *c)
{
    struct nbd_store *st = c->st;
    if (nbd_aio_is_dead(c->h) || nbd_aio_is_closed(c->h)) {
        const char *e = nbd_get_error();
        conn_down(c, e ? e : "the server closed the connection");
        return;
    }
    if (c->state == C_CONNECTING && nbd_aio_is_ready(c->h)) {
        char why[160];
        if (!same_export(c, why, sizeof(why))) {
            conn_down(c, why);
            return;
        }
        c->state = C_READY;
        c->backoff_ns = 0;
        c->why[0] = 0;
        __atomic_add_fetch(&st->ready_conns, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&st->reconnects, 1, __ATOMIC_RELAXED);
        vd_store_note(&st->s, 0, "connection %d to %s is back", c->index, st->p.uri);
        issue_waiting(st);
    }
    if (c->h)
        update_events(c);
    conn_schedule(c);
}

static void conn_ready(struct vd_source *src, uint32_t events)
{
    struct conn *c = (struct conn *)src;
    if (!c->h)
        return;
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR))
        nbd_aio_notify_read(c->h);
    if (c->h && (events & EPOLLOUT) && !nbd_aio_is_dead(c->h))
        nbd_aio_notify_write(c->h);
    conn_look(c);
}

static void conn_connect(struct conn *c)
{
    struct nbd_store *st = c->st;
    c->h = nbd_create();
    if (!c->h || nbd_aio_connect_uri(c->h, st->p.uri) < 0) {
        char why[160];
        snprintf(why, sizeof(why), "%s", nbd_get_error() ? nbd_get_error() : "cannot connect");
        conn_down(c, why);
        return;
    }
    c->state = C_CONNECTING;
    c->connect_deadline = vd_now_ns() + (uint64_t)(st->p.io_timeout_ms ? st->p.io_timeout_ms : 30000) * 1000000ull;
    conn_look(c);
}

/* When the worker must look at the connection without an event: to connect
 * again, or because an operation (in flight or waiting) may time out. */
static void conn_schedule(struct conn *c)
{
    struct nbd_store *st = c->st;
    uint64_t t = 0, timeout = (uint64_t)st->p.io_timeout_ms * 1000000ull;
    if (c->state == C_DOWN)
        t = c->retry_at;
    else if (c->state == C_CONNECTING)
        t = c->connect_deadline;
    else if (timeout && c->issued)
        t = c->issued->since + timeout;
    if (timeout && st->waiting && c->index == 0 && (!t || st->waiting->since + timeout < t))
        t = st->waiting->since + timeout; /* connection 0 also watches the waiting ones */
    c->src.deadline = t;
}

static void conn_tick(struct vd_source *src, uint64_t now)
{
    struct conn *c = (struct conn *)src;
    struct nbd_store *st = c->st;
    if (c->index == 0) {
        int n = 0;
        while (st->waiting && timed_out(st, st->waiting, now)) {
            struct vd_io *io = st->waiting;
            unlink_io(&st->waiting, &st->waiting_tail, io);
            finish(io, -ETIMEDOUT);
            n++;
        }
        if (n) {
            __atomic_add_fetch(&st->timeouts, n, __ATOMIC_RELAXED);
            vd_store_note(&st->s, 1, "%d request(s) failed after waiting %u s for %s", n, st->p.io_timeout_ms / 1000,
                          st->p.uri);
        }
    }
    if (c->state == C_DOWN && now >= c->retry_at) {
        conn_connect(c);
    } else if (c->state == C_CONNECTING && now >= c->connect_deadline) {
        conn_down(c, "connecting takes too long");
    } else if (c->state == C_READY && c->issued && timed_out(st, c->issued, now)) {
        conn_down(c, "the server does not answer");
    }
    conn_schedule(c);
}

static void conn_destroy(struct vd_source *src)
{
    struct conn *c = (struct conn *)src;
    struct nbd_store *st = c->st;
    nbd_close(c->h);
    c->h = NULL;
    if (--st->alive == 0) {
        pthread_mutex_destroy(&st->s.note_lock);
        free(st);
    }
}

static int nbd_start(struct vd_store *s, struct vd_io *io)
{
    struct nbd_store *st = (struct nbd_store *)s;
    io->since = vd_now_ns();
    io->conn = NULL;
    if ((io->op == VD_IO_READ || io->op == VD_IO_WRITE) && io->niov != 1) {
        io->res = -EINVAL; /* blk.c bounces scattered buffers for us (contiguous) */
        return 1;
    }
    push(&st->waiting, &st->waiting_tail, io); /* behind what already waits */
    issue_waiting(st);
    for (int i = 0; i < st->nconn; i++)
        conn_schedule(&st->conn[i]);
    return 0;
}

static void nbd_destroy(struct vd_store *s)
{
    struct nbd_store *st = (struct nbd_store *)s;
    if (st->attached) {
        /* The worker closes them after its round (they may be in its epoll
         * events) and frees st with the last one: st is not ours to read
         * once the last is handed over. */
        int n = st->nconn;
        for (int i = 0; i < n; i++)
            vd_source_remove(&st->conn[i].src);
        return;
    }
    for (int i = 0; i < st->nconn; i++)
        nbd_close(st->conn[i].h);
    pthread_mutex_destroy(&st->s.note_lock);
    free(st);
}

static const struct vd_store_ops nbd_ops = {.start = nbd_start, .destroy = nbd_destroy};

int vd_nbd_available(void)
{
    return 1;
}

static struct nbd_handle *connect_now(const char *uri, char *err, size_t errlen)
{
    struct nbd_handle *h = nbd_create();
    if (!h) {
        snprintf(err, errlen, "%s", nbd_get_error());
        return NULL;
    }
    if (nbd_connect_uri(h, uri) < 0) {
        snprintf(err, errlen, "cannot connect to %s: %s", uri, nbd_get_error());
        nbd_close(h);
        return NULL;
    }
    return h;
}

vd_store *vd_nbd_store_new(const struct vd_nbd_params *p, char *err, size_t errlen)
{
    struct nbd_store *st = calloc(1, sizeof(*st));
    if (!st) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    vd_store_init(&st->s, &nbd_ops);
    st->p = *p;
    st->p.uri[sizeof(st->p.uri) - 1] = 0;
    struct nbd_handle *h = connect_now(st->p.uri, err, errlen);
    if (!h) {
        free(st);
        return NULL;
    }
    st->size = nbd_get_size(h);
    st->readonly = nbd_is_read_only(h) == 1;
    st->can_flush = nbd_can_flush(h) == 1;
    st->can_trim = nbd_can_trim(h) == 1;
    st->can_zero = nbd_can_zero(h) == 1;
    st->multi_conn = nbd_can_multi_conn(h) == 1;
    int64_t min = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
    st->block_min = min > 512 ? (uint32_t)min : 512;
    st->nconn = p->connections < 1 ? 1 : p->connections > VD_NBD_MAX_CONN ? VD_NBD_MAX_CONN : p->connections;
    if (!st->multi_conn)
        st->nconn = 1; /* several connections would not see each other's writes in order */
    st->conn[0].h = h;
    for (int i = 1; i < st->nconn; i++) {
        st->conn[i].h = connect_now(st->p.uri, err, errlen);
        if (!st->conn[i].h) {
            for (int j = 0; j < i; j++)
                nbd_close(st->conn[j].h);
            free(st);
            return NULL;
        }
    }
    for (int i = 0; i < st->nconn; i++) {
        struct conn *c = &st->conn[i];
        c->st = st;
        c->index = i;
        c->state = C_READY;
        c->src.ready = conn_ready;
        c->src.tick = conn_tick;
        c->src.destroy = conn_destroy;
    }
    st->ready_conns = st->nconn;
    st->alive = st->nconn;
    st->s.contiguous = 1;
    st->s.len_align = st->block_min;
    st->s.max_len = MAX_LEN;
    return &st->s;
}

int vd_nbd_store_attach(vd_store *s, vd_engine *e, int worker)
{
    struct nbd_store *st = (struct nbd_store *)s;
    st->attached = 1;
    for (int i = 0; i < st->nconn; i++) {
        struct conn *c = &st->conn[i];
        unsigned dir = nbd_aio_get_direction(c->h);
        uint32_t ev = EPOLLIN | (dir & LIBNBD_AIO_DIRECTION_WRITE ? EPOLLOUT : 0);
        int rc = vd_source_add(e, worker, &c->src, nbd_aio_get_fd(c->h), ev);
        if (rc)
            return rc;
    }
    return 0;
}

void vd_nbd_store_info(vd_store *s, struct vd_nbd_info *out)
{
    struct nbd_store *st = (struct nbd_store *)s;
    out->size = st->size;
    out->readonly = st->readonly;
    out->can_flush = st->can_flush;
    out->can_trim = st->can_trim;
    out->can_zero = st->can_zero;
    out->multi_conn = st->multi_conn;
    out->block_min = st->block_min;
    out->connections = st->nconn;
    out->ready = __atomic_load_n(&st->ready_conns, __ATOMIC_RELAXED);
    out->reconnects = __atomic_load_n(&st->reconnects, __ATOMIC_RELAXED);
    out->timeouts = __atomic_load_n(&st->timeouts, __ATOMIC_RELAXED);
}

#else /* no libnbd */

int vd_nbd_available(void)
{
    return 0;
}

vd_store *vd_nbd_store_new(const struct vd_nbd_params *p, char *err, size_t errlen)
{
    snprintf(err, errlen, "vhostd was built without libnbd (install libnbd-dev and reinstall vhostd)");
    return NULL;
}

int vd_nbd_store_attach(vd_store *s, vd_engine *e, int worker)
{
    return -ENOSYS;
}

void vd_nbd_store_info(vd_store *s, struct vd_nbd_info *out)
{
    memset(out, 0, sizeof(*out));
}

#endif
