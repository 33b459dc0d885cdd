/* The RBD store: an image in a Ceph cluster, through librbd's asynchronous
 * API.
 *
 * Each operation becomes one rbd_aio_* call on the guest's own buffers
 * (scatter-gather, no bounce); librbd completes it on its own threads and
 * vd_aio_deliver hands it to the worker that issued it, so the device's
 * queues may run on any worker.
 *
 * Failures are Ceph's to mend: librados follows OSDs and monitors as they
 * come and go and sends an operation again until the cluster takes it, so
 * a killed OSD that comes back (or whose data moves elsewhere) only delays
 * requests.  io_timeout (librados' rados_osd_op_timeout) bounds that wait
 * instead, failing the request with ETIMEDOUT.  The store watches its
 * in-flight operations: when the oldest has waited warn_after it says so in
 * the log once, and again when the cluster answers.
 *
 * Devices on the same cluster (same ceph.conf, user, keyring and timeout)
 * share one connection (rados_t): one monitor session and one set of
 * librados threads, not one per disk.
 *
 * Built without librbd, it only says so.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "store.h"
#include "vd.h"

#ifdef VD_HAVE_RBD
#include <rados/librados.h>
#include <rbd/librbd.h>

#define WATCH_NS 1000000000ull  /* how often the worker looks */
#define CONNECT_TIMEOUT "15"    /* seconds rados_connect may take (client_mount_timeout) */

/* A connection to a cluster, shared by the stores that name it alike. */
struct cluster {
    struct vd_rbd_params key; /* conf, user, keyring, io_timeout_s (the rest zeroed) */
    rados_t rados;
    int refs;
    struct cluster *next;
};

static pthread_mutex_t clusters_lock = PTHREAD_MUTEX_INITIALIZER;
static struct cluster *clusters;

struct rbd_store {
    struct vd_store s;
    struct vd_source watch; /* on a worker once attached: looks for stalls */
    int attached;
    struct cluster *cl;
    rados_ioctx_t ioctx;
    rbd_image_t image;
    char name[528];         /* pool/[namespace/]image[@snapshot], for the log */
    int64_t size;
    uint64_t object_size;
    int readonly;
    uint64_t warn_ns;       /* an operation waiting this long means the cluster does not answer */
    pthread_mutex_t lock;   /* the in-flight list: issuing workers, librbd's threads, the watch */
    struct vd_io *inflight, *inflight_tail; /* oldest first */
    int ninflight;
    int stalled;
    uint64_t stalled_since, stalls, timeouts;
};

static void cluster_key(struct vd_rbd_params *key, const struct vd_rbd_params *p)
{
    memset(key, 0, sizeof(*key));
    memcpy(key->conf, p->conf, sizeof(key->conf));
    memcpy(key->user, p->user, sizeof(key->user));
    memcpy(key->keyring, p->keyring, sizeof(key->keyring));
    key->io_timeout_s = p->io_timeout_s;
}

static struct cluster *cluster_get(const struct vd_rbd_params *p, char *err, size_t errlen)
{
    struct vd_rbd_params key;
    cluster_key(&key, p);
    pthread_mutex_lock(&clusters_lock); /* held while connecting: a second disk waits and shares */
    struct cluster *cl;
    for (cl = clusters; cl; cl = cl->next)
        if (memcmp(&cl->key, &key, sizeof(key)) == 0) {
            cl->refs++;
            pthread_mutex_unlock(&clusters_lock);
            return cl;
        }
    rados_t r;
    char id[sizeof(key.user) + 8];
    snprintf(id, sizeof(id), "client.%s", key.user);
    int rc = rados_create2(&r, "ceph", id, 0);
    if (rc < 0) {
        snprintf(err, errlen, "cannot make a Ceph client %s: %s", id, strerror(-rc));
        goto fail;
    }
    char tmo[16];
    snprintf(tmo, sizeof(tmo), "%u", key.io_timeout_s);
    const char *what = "client_mount_timeout";
    if ((rc = rados_conf_read_file(r, key.conf)) < 0) {
        snprintf(err, errlen, "cannot read the Ceph configuration %s: %s", key.conf, strerror(-rc));
        goto shutdown;
    }
    if ((rc = rados_conf_set(r, what, CONNECT_TIMEOUT)) < 0 || (rc = rados_conf_set(r, what = "rados_mon_op_timeout", CONNECT_TIMEOUT)) < 0 ||
        (rc = rados_conf_set(r, what = "rados_osd_op_timeout", tmo)) < 0 ||
        /* A write librbd's cache acknowledged and that then timed out would
         * be lost behind a flush that succeeds: with a timeout, no cache. */
        (key.io_timeout_s && (rc = rados_conf_set(r, what = "rbd_cache", "false")) < 0) ||
        (key.keyring[0] && (rc = rados_conf_set(r, what = "keyring", key.keyring)) < 0)) {
        snprintf(err, errlen, "cannot set Ceph option %s: %s", what, strerror(-rc));
        goto shutdown;
    }
    if ((rc = rados_connect(r)) < 0) {
        snprintf(err, errlen, "cannot connect to the Ceph cluster of %s as %s: %s", key.conf, id, strerror(-rc));
        goto shutdown;
    }
    cl = calloc(1, sizeof(*cl));
    if (!cl) {
        snprintf(err, errlen, "out of memory");
        goto shutdown;
    }
    cl->key = key;
    cl->rados = r;
    cl->refs = 1;
    cl->next = clusters;
    clusters = cl;
    pthread_mutex_unlock(&clusters_lock);
    return cl;
shutdown:
    rados_shutdown(r);
fail:
    pthread_mutex_unlock(&clusters_lock);
    return NULL;
}

static void cluster_put(struct cluster *cl)
{
    pthread_mutex_lock(&clusters_lock);
    int last = --cl->refs == 0;
    if (last)
        for (struct cluster **pp = &clusters; *pp; pp = &(*pp)->next)
            if (*pp == cl) {
                *pp = cl->next;
                break;
            }
    pthread_mutex_unlock(&clusters_lock);
    if (last) {
        rados_shutdown(cl->rados);
        free(cl);
    }
}

static void inflight_push(struct rbd_store *st, struct vd_io *io)
{
    io->s_prev = st->inflight_tail;
    io->s_next = NULL;
    if (st->inflight_tail)
        st->inflight_tail->s_next = io;
    else
        st->inflight = io;
    st->inflight_tail = io;
    st->ninflight++;
}

static void inflight_unlink(struct rbd_store *st, struct vd_io *io)
{
    if (io->s_prev)
        io->s_prev->s_next = io->s_next;
    else
        st->inflight = io->s_next;
    if (io->s_next)
        io->s_next->s_prev = io->s_prev;
    else
        st->inflight_tail = io->s_prev;
    io->s_prev = io->s_next = NULL;
    st->ninflight--;
}

/* librbd's completion, on one of its threads. */
static void rbd_done(rbd_completion_t c, void *arg)
{
    struct vd_io *io = arg;
    struct rbd_store *st = io->conn;
    ssize_t r = rbd_aio_get_return_value(c);
    rbd_aio_release(c);
    pthread_mutex_lock(&st->lock);
    inflight_unlink(st, io);
    if (r == -ETIMEDOUT)
        st->timeouts++;
    pthread_mutex_unlock(&st->lock);
    /* A read returns the bytes it moved; a write, flush, trim or zeroing 0. */
    vd_aio_deliver(io, r < 0 ? r : io->op == VD_IO_READ ? r : (int64_t)io->moved);
}

static int rbd_start(struct vd_store *s, struct vd_io *io)
{
    struct rbd_store *st = (struct rbd_store *)s;
    rbd_completion_t c;
    int rc = rbd_aio_create_completion(io, rbd_done, &c);
    if (rc < 0) {
        io->res = rc;
        return 1;
    }
    io->conn = st;
    io->moved = 0;
    if (io->op == VD_IO_READ || io->op == VD_IO_WRITE)
        for (int i = 0; i < io->niov; i++)
            io->moved += io->iov[i].iov_len;
    pthread_mutex_lock(&st->lock); /* listed before librbd has it: its callback may come at once */
    io->since = vd_now_ns();
    inflight_push(st, io);
    pthread_mutex_unlock(&st->lock);
    switch (io->op) {
    case VD_IO_READ:
        rc = rbd_aio_readv(st->image, io->iov, io->niov, io->off, c);
        break;
    case VD_IO_WRITE:
        rc = rbd_aio_writev(st->image, io->iov, io->niov, io->off, c);
        break;
    case VD_IO_FLUSH:
        rc = rbd_aio_flush(st->image, c);
        break;
    case VD_IO_DISCARD:
        rc = rbd_aio_discard(st->image, io->off, io->len, c);
        break;
    case VD_IO_ZERO:
        /* librbd deallocates whole objects it zeroes unless asked to keep them thick */
        rc = rbd_aio_write_zeroes(st->image, io->off, io->len, c, io->unmap ? 0 : RBD_WRITE_ZEROES_FLAG_THICK_PROVISION, 0);
        break;
    default:
        rc = -EINVAL;
    }
    if (rc < 0) {
        pthread_mutex_lock(&st->lock);
        inflight_unlink(st, io);
        pthread_mutex_unlock(&st->lock);
        rbd_aio_release(c);
        io->res = rc;
        return 1;
    }
    return 0;
}

/* On the worker, every WATCH_NS: has the oldest operation waited too long? */
static void watch_tick(struct vd_source *src, uint64_t now)
{
    struct rbd_store *st = (struct rbd_store *)((char *)src - offsetof(struct rbd_store, watch));
    enum { QUIET, STALLED, ANSWERS } say = QUIET;
    pthread_mutex_lock(&st->lock);
    int late = st->inflight && now - st->inflight->since >= st->warn_ns;
    int n = st->ninflight;
    uint64_t since = st->stalled_since;
    if (late && !st->stalled) {
        st->stalled = 1;
        st->stalled_since = st->inflight->since;
        st->stalls++;
        say = STALLED;
    } else if (!late && st->stalled) {
        st->stalled = 0;
        say = ANSWERS;
    }
    pthread_mutex_unlock(&st->lock);
    if (say == STALLED)
        vd_store_note(&st->s, 1, "%s: %d request(s) waiting, the oldest for %.0f s: the Ceph cluster does not answer",
                      st->name, n, (double)st->warn_ns / 1e9);
    else if (say == ANSWERS)
        vd_store_note(&st->s, 0, "%s: the Ceph cluster answers again (after %.0f s)", st->name,
                      (double)(now - since) / 1e9);
    src->deadline = now + WATCH_NS;
}

/* Closing waits for librbd (it flushes its cache), possibly on a cluster
 * that does not answer: never on a worker or the event loop. */
static void close_store(struct vd_store *s)
{
    struct rbd_store *st = (struct rbd_store *)s;
    rbd_close(st->image);
    rados_ioctx_destroy(st->ioctx);
    cluster_put(st->cl);
    pthread_mutex_destroy(&st->lock);
    pthread_mutex_destroy(&st->s.note_lock);
    free(st);
}

static void watch_destroy(struct vd_source *src)
{
    struct rbd_store *st = (struct rbd_store *)((char *)src - offsetof(struct rbd_store, watch));
    vd_store_close_later(&st->s, close_store);
}

static void rbd_destroy(struct vd_store *s)
{
    struct rbd_store *st = (struct rbd_store *)s;
    if (st->attached)
        vd_source_remove(&st->watch); /* the worker hands it on after its round */
    else
        vd_store_close_later(s, close_store);
}

static const struct vd_store_ops rbd_ops = {.start = rbd_start, .destroy = rbd_destroy};

int vd_rbd_available(void)
{
    return 1;
}

/* The store's name in the log: pool/[namespace/]image[@snapshot]. */
static void make_name(struct rbd_store *st, const struct vd_rbd_params *p)
{
    snprintf(st->name, sizeof(st->name), "%s/%s%s%s%s%s", p->pool, p->ns, p->ns[0] ? "/" : "", p->image,
             p->snap[0] ? "@" : "", p->snap);
}

static vd_store *open_image(const struct vd_rbd_params *p, char *err, size_t errlen)
{
    struct rbd_store *st = calloc(1, sizeof(*st));
    if (!st) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    vd_store_init(&st->s, &rbd_ops);
    pthread_mutex_init(&st->lock, NULL);
    make_name(st, p);
    st->cl = cluster_get(p, err, errlen);
    if (!st->cl)
        goto free;
    int rc = rados_ioctx_create(st->cl->rados, p->pool, &st->ioctx);
    if (rc < 0) {
        snprintf(err, errlen, rc == -ENOENT ? "there is no pool '%s' in the Ceph cluster" : "cannot open pool '%s': %s",
                 p->pool, strerror(-rc));
        goto put;
    }
    rados_ioctx_set_namespace(st->ioctx, p->ns);
    st->readonly = p->readonly || p->snap[0];
    const char *snap = p->snap[0] ? p->snap : NULL;
    rc = st->readonly ? rbd_open_read_only(st->ioctx, p->image, &st->image, snap)
                      : rbd_open(st->ioctx, p->image, &st->image, snap);
    if (rc < 0) {
        if (rc == -ENOENT)
            snprintf(err, errlen, "there is no image %s in the Ceph cluster", st->name);
        else
            snprintf(err, errlen, "cannot open image %s: %s", st->name, strerror(-rc));
        goto ioctx;
    }
    rbd_image_info_t info;
    uint64_t size;
    if ((rc = rbd_get_size(st->image, &size)) < 0 || (rc = rbd_stat(st->image, &info, sizeof(info))) < 0) {
        snprintf(err, errlen, "cannot stat image %s: %s", st->name, strerror(-rc));
        rbd_close(st->image);
        goto ioctx;
    }
    st->size = (int64_t)size;
    st->warn_ns = (uint64_t)(p->warn_after_s ? p->warn_after_s : 10) * 1000000000ull;
    st->object_size = info.obj_size;
    st->watch.tick = watch_tick;
    st->watch.destroy = watch_destroy;
    return &st->s;
ioctx:
    rados_ioctx_destroy(st->ioctx);
put:
    cluster_put(st->cl);
free:
    pthread_mutex_destroy(&st->lock);
    pthread_mutex_destroy(&st->s.note_lock);
    free(st);
    return NULL;
}

vd_store *vd_rbd_store_new(const struct vd_rbd_params *p, char *err, size_t errlen)
{
    /* librados starts its threads here: they must leave the daemon's
     * signals (SIGTERM, SIGHUP) to its own threads. */
    struct vd_rbd_params q = *p;
    q.conf[sizeof(q.conf) - 1] = q.user[sizeof(q.user) - 1] = q.keyring[sizeof(q.keyring) - 1] = 0;
    q.pool[sizeof(q.pool) - 1] = q.ns[sizeof(q.ns) - 1] = q.image[sizeof(q.image) - 1] = q.snap[sizeof(q.snap) - 1] = 0;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    vd_store *s = open_image(&q, err, errlen);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return s;
}

int vd_rbd_store_attach(vd_store *s, vd_engine *e, int worker)
{
    struct rbd_store *st = (struct rbd_store *)s;
    st->watch.deadline = vd_now_ns() + WATCH_NS;
    int rc = vd_source_add(e, worker, &st->watch, -1, 0);
    if (rc == 0)
        st->attached = 1;
    return rc;
}

void vd_rbd_store_info(vd_store *s, struct vd_rbd_info *out)
{
    struct rbd_store *st = (struct rbd_store *)s;
    memset(out, 0, sizeof(*out));
    out->size = st->size;
    out->object_size = st->object_size;
    out->readonly = st->readonly;
    pthread_mutex_lock(&st->lock);
    out->inflight = st->ninflight;
    out->oldest_ms = st->inflight ? (vd_now_ns() - st->inflight->since) / 1000000 : 0;
    out->stalled = st->stalled;
    out->stalls = st->stalls;
    out->timeouts = st->timeouts;
    pthread_mutex_unlock(&st->lock);
}

/* Take (acquire = 1) or drop librbd's exclusive lock, managed by hand
 * (RBD_LOCK_MODE_EXCLUSIVE: librbd does not hand it to another client that
 * asks).  Blocks for cluster round-trips: never call it on a worker.
 * -EBUSY: another client holds it (err names it). */
int vd_rbd_store_lock(vd_store *s, int acquire, char *err, size_t errlen)
{
    struct rbd_store *st = (struct rbd_store *)s;
    if (!acquire) {
        int rc = rbd_lock_release(st->image);
        if (rc < 0 && rc != -EINVAL) /* -EINVAL: not held */
            snprintf(err, errlen, "cannot release the lock of image %s: %s", st->name, strerror(-rc));
        return rc == -EINVAL ? 0 : rc;
    }
    uint64_t features = 0;
    int rc = rbd_get_features(st->image, &features);
    if (rc < 0) {
        snprintf(err, errlen, "cannot read the features of image %s: %s", st->name, strerror(-rc));
        return rc;
    }
    if (!(features & RBD_FEATURE_EXCLUSIVE_LOCK)) {
        snprintf(err, errlen, "image %s has no exclusive-lock feature, so it cannot be locked "
                 "(rbd feature enable %s exclusive-lock)", st->name, st->name);
        return -EOPNOTSUPP;
    }
    rc = rbd_lock_acquire(st->image, RBD_LOCK_MODE_EXCLUSIVE);
    if (rc == 0)
        return 0;
    char *owners[4];
    size_t n = 4;
    rbd_lock_mode_t mode;
    char who[256] = "";
    if (rbd_lock_get_owners(st->image, &mode, owners, &n) == 0) {
        size_t used = 0;
        for (size_t i = 0; i < n && used < sizeof(who); i++)
            used += snprintf(who + used, sizeof(who) - used, "%s%s", i ? ", " : "", owners[i]);
        rbd_lock_get_owners_cleanup(owners, n);
    }
    if (who[0])
        snprintf(err, errlen, "image %s is locked by the Ceph client at %s", st->name, who);
    else
        snprintf(err, errlen, "cannot lock image %s: %s", st->name, strerror(-rc));
    return who[0] ? -EBUSY : rc;
}

#else /* no librbd */

int vd_rbd_available(void)
{
    return 0;
}

vd_store *vd_rbd_store_new(const struct vd_rbd_params *p, char *err, size_t errlen)
{
    snprintf(err, errlen, "vhostd was built without librbd (install librbd-dev and reinstall vhostd)");
    return NULL;
}

int vd_rbd_store_attach(vd_store *s, vd_engine *e, int worker)
{
    return -ENOSYS;
}

void vd_rbd_store_info(vd_store *s, struct vd_rbd_info *out)
{
    memset(out, 0, sizeof(*out));
}

int vd_rbd_store_lock(vd_store *s, int acquire, char *err, size_t errlen)
{
    snprintf(err, errlen, "vhostd was built without librbd");
    return -ENOSYS;
}

#endif
