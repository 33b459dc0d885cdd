/* Requests: the life of one descriptor chain in the device's hands.
 *
 * A request is taken from the ring into its queue's pool, in the slot of
 * its head descriptor (split) or buffer id (packed): a driver may not make
 * either available again while it is in use, so a busy slot is a broken
 * driver.  It is handed to the device, which completes it at once
 * (VD_REQ_DONE) or submits I/O and completes it later from that I/O's
 * completion, on the same worker (VD_REQ_PENDING).  Used entries therefore
 * go out in completion order, which both ring layouts allow; they are made
 * visible in batches, one signal per batch.
 *
 * A pending request keeps alive what its iovecs point into: the memory
 * table it was mapped against (q->mem_refs counts the pending requests of
 * the current table; a table change hands that count to the old table) and
 * its pool.  When its queue stops before it completes (front-end gone,
 * reset, restart) the pool is orphaned: the I/O runs to its end, then the
 * request only gives back what it holds and writes nothing to the guest.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vd.h"

struct vd_reqpool {
    struct vd_queue *q;
    uint32_t num;
    uint32_t pending;     /* requests submitted and not yet completed */
    int orphaned;         /* its queue stopped: see above */
    size_t slot_size;
    uint64_t buf_bytes;   /* scratch memory held by its requests */
    _Alignas(16) unsigned char slots[];
};

static inline struct vd_req *slot(struct vd_reqpool *p, uint32_t head)
{
    return (struct vd_req *)(p->slots + (size_t)head * p->slot_size);
}

static void pool_free(struct vd_reqpool *p)
{
    for (uint32_t i = 0; i < p->num; i++)
        free(slot(p, i)->big_iov);
    free(p);
}

int vd_reqs_start(struct vd_queue *q, char *err, size_t errlen)
{
    struct vd_reqpool *p = q->pool;
    if (p && p->num == q->num)
        return 0; /* a stopped queue's pool has nothing pending: it is orphaned otherwise */
    if (p)
        pool_free(p);
    q->pool = NULL;
    size_t size = (sizeof(struct vd_req) + q->dev->req_priv + 15) & ~(size_t)15;
    p = calloc(1, sizeof(*p) + size * q->num);
    if (!p) {
        snprintf(err, errlen, "queue %d: out of memory for %u requests", q->index, q->num);
        return -ENOMEM;
    }
    p->q = q;
    p->num = q->num;
    p->slot_size = size;
    q->pool = p;
    return 0;
}

int vd_reqs_stop(struct vd_queue *q)
{
    struct vd_reqpool *p = q->pool;
    q->starved = q->resume = 0;
    q->draining = 0;
    if (!p || !p->pending)
        return 0;
    p->orphaned = 1;
    /* Their references now count on the table itself. */
    vd_mem_get(q->dev->mem, (int)q->mem_refs);
    q->mem_refs = 0;
    q->pool = NULL;
    return 1;
}

void vd_reqs_free(struct vd_queue *q)
{
    if (q->pool)
        pool_free(q->pool);
    q->pool = NULL;
}

uint32_t vd_reqs_pending(const struct vd_queue *q)
{
    return q->pool ? q->pool->pending : 0;
}

void vd_reqs_mem_swap(struct vd_device *d, struct vd_mem *fresh)
{
    struct vd_mem *old = d->mem;
    for (int i = 0; i < d->nqueues; i++) {
        vd_mem_get(old, (int)d->q[i].mem_refs);
        d->q[i].mem_refs = 0;
    }
    d->mem = fresh;
    vd_mem_put(old);
}

struct vd_queue *vd_req_queue(const struct vd_req *req)
{
    return req->pool->q;
}

int vd_req_live(const struct vd_req *req)
{
    return !req->pool->orphaned && !req->pool->q->broken;
}

int vd_req_buf(struct vd_req *req, size_t len, size_t align, void **out)
{
    struct vd_reqpool *p = req->pool;
    /* Over the limit, wait for the others (there are some) to give theirs back. */
    if (p->buf_bytes + len > VD_REQ_BUF_LIMIT && p->pending)
        return VD_REQ_RETRY;
    void *b;
    if (align < sizeof(void *))
        align = sizeof(void *);
    if (posix_memalign(&b, align, len ? len : 1))
        return -ENOMEM;
    free(req->buf);
    p->buf_bytes -= req->buf_len;
    req->buf = b;
    req->buf_len = len;
    p->buf_bytes += len;
    *out = b;
    return 0;
}

static void record_latency(struct vd_queue *q, uint64_t ns)
{
    uint64_t us = ns / 1000;
    unsigned k = us ? 64 - __builtin_clzll(us) : 0; /* smallest k with us < 2^k */
    q->st.lat[k < VD_LAT_BUCKETS ? k : VD_LAT_BUCKETS - 1]++;
    q->st.lat_sum_ns += ns;
}

/* The used entry and the accounting of a request completed on a running queue. */
static void finish(struct vd_queue *q, struct vd_req *req)
{
    if (__builtin_expect(q->dev->log_on, 0)) {
        /* All of the writable part, not just used_len: a device may write
         * at its end (blk's status byte) without counting what lies between.
         * A pending request's iovecs point into the table it was taken with. */
        const struct vd_mem *m = req->pending ? req->mem : q->dev->mem;
        vd_log_iov(q, m, req->iov + req->nout, req->nin, UINT64_MAX);
    }
    if (q->inflight)
        vd_inflight_complete(q, req->head, req->ndesc, req->used_len);
    else
        vd_ring_put_used(q, req->head, req->ndesc, req->used_len);
    if (req->t0)
        record_latency(q, vd_now_ns() - req->t0);
    q->st.requests++;
    q->st.out_bytes += req->out_bytes;
    q->st.in_bytes += req->used_len;
}

static void drop_buf(struct vd_reqpool *p, struct vd_req *req)
{
    if (req->buf) {
        free(req->buf);
        p->buf_bytes -= req->buf_len;
        req->buf = NULL;
        req->buf_len = 0;
    }
}

/* A pending request is over: give back what it holds.  Returns 1 when it
 * was the last of an orphaned pool, which is then freed. */
static int release(struct vd_req *req)
{
    struct vd_reqpool *p = req->pool;
    struct vd_queue *q = p->q;
    drop_buf(p, req);
    req->pending = 0;
    p->pending--;
    if (p->orphaned) {
        vd_mem_put(req->mem);
        if (!p->pending) {
            pool_free(p);
            return 1;
        }
        return 0;
    }
    if (req->mem == q->dev->mem)
        q->mem_refs--;
    else
        vd_mem_put(req->mem);
    req->mem = NULL;
    if (q->starved) {
        q->starved = 0;
        q->resume = 1; /* the worker takes the waiting request again */
    }
    if (q->draining && !p->pending && q->dev->event_fd >= 0) {
        uint64_t one = 1; /* the control plane waits for this (GET_VRING_BASE) */
        if (write(q->dev->event_fd, &one, sizeof(one)) < 0) {
        }
    }
    return 0;
}

void vd_req_complete(struct vd_req *req)
{
    struct vd_reqpool *p = req->pool;
    struct vd_queue *q = p->q;
    if (!p->orphaned && !q->broken) {
        if (!q->dirty) {
            q->dirty = 1;
            q->dirty_from = q->used_idx;
        }
        finish(q, req);
    }
    req->pending = 2; /* completed: released by vd_reqs_io_done after the callback */
}

struct done_call {
    struct vd_io *io;
    int64_t res;
};

static int call_done(void *arg)
{
    struct done_call *c = arg;
    c->io->done(c->io, c->res);
    return 0;
}

int vd_reqs_io_done(struct vd_io *io, int64_t res)
{
    struct vd_req *req = io->req;
    struct vd_queue *q = req->pool->q;
    struct done_call c = {io, res};
    void *addr;
    if (vd_try_guarded(call_done, &c, &addr) == VD_FAULTED) {
        /* The device's completion touched memory the front-end took away;
         * devices submit nothing more once they touched guest memory, so the
         * request is over. */
        if (vd_req_live(req))
            vd_queue_fail(q, "queue %d: guest memory access faulted (SIGBUS) completing a request: the "
                             "front-end shrank shared memory", q->index);
        return release(req);
    }
    return req->pending == 2 ? release(req) : 0;
}

/* Take the chain the ring layer walked into c and q->scratch (a new one:
 * `fresh`; else one redone after a restart).  Returns 0 (handled: done or
 * pending), 1 when the device asked to retry later (nothing taken), -1
 * when the queue broke. */
static int take(struct vd_queue *q, const struct vd_chain *c, int fresh)
{
    struct vd_reqpool *p = q->pool;
    if (c->id >= p->num) {
        vd_queue_fail(q, "queue %d: the ring names buffer id %u, ring size is %u", q->index, c->id, q->num);
        return -1;
    }
    struct vd_req *req = slot(p, c->id);
    if (req->pending) {
        vd_queue_fail(q, "queue %d: %s %u was made available again while its request is pending", q->index,
                      q->packed ? "buffer id" : "descriptor", c->id);
        return -1;
    }
    int n = c->nout + c->nin;
    if (n <= VD_REQ_INLINE_IOV) {
        req->iov = req->inline_iov;
    } else {
        if (req->big_cap < n) {
            struct iovec *big = realloc(req->big_iov, (size_t)n * sizeof(*big));
            if (!big) {
                vd_queue_fail(q, "queue %d: out of memory for a chain of %d buffers", q->index, n);
                return -1;
            }
            req->big_iov = big;
            req->big_cap = n;
        }
        req->iov = req->big_iov;
    }
    memcpy(req->iov, q->scratch, (size_t)n * sizeof(struct iovec)); /* scratch is hot; slots are many */
    vd_req_from_chain(req, c, req->iov);
    req->queue = (uint16_t)q->index;
    req->used_len = 0;
    req->aio = q->aio;
    req->pool = p;
    req->t0 = q->dev->timing ? vd_now_ns() : 0;
    if (q->inflight && fresh && vd_inflight_begin(q, c) < 0)
        return -1;
    int r = q->dev->handle(q->dev->ctx, req);
    if (r == VD_REQ_PENDING) {
        req->pending = 1;
        p->pending++;
        req->mem = q->dev->mem;
        q->mem_refs++;
        return 0;
    }
    if (r == VD_REQ_RETRY) {
        drop_buf(p, req);
        if (q->inflight && fresh)
            vd_inflight_cancel(q, c->id);
        q->starved = 1;
        return 1;
    }
    drop_buf(p, req);
    finish(q, req);
    return 0;
}

/* How far ahead the next chains are prefetched (chains): their
 * descriptors, and the first line of the buffer whose descriptor came in
 * a step earlier.  Farther (4/2, 8/4) was no better or worse (net_ab.py). */
#define PREFETCH_DESC 2
#define PREFETCH_BUF 1

int vd_queue_process(struct vd_queue *q, int quiet)
{
    unsigned since_publish = 0, budget = VD_BUDGET;
    int ret = VD_IDLE;

    /* Nothing new while draining or waiting for scratch memory (a completion
     * brings the queue back), or while orphans of an earlier session are
     * still in flight (the engine pokes every queue when they are gone). */
    if (q->draining || q->starved || __atomic_load_n(&q->dev->orphans, __ATOMIC_RELAXED))
        return VD_IDLE;
    vd_ring_read_fresh_used(q);
    uint16_t batch_start = q->used_idx;
    if (q->inflight_recover) {
        q->inflight_recover = 0;
        if (vd_inflight_recover(q) < 0)
            goto out;
    }
    /* Requests a crashed predecessor took and never completed come first. */
    while (q->resubmit_pos < q->nresubmit) {
        if (!budget) {
            ret = VD_MORE; /* more to redo: come back, as for a full ring */
            goto out;
        }
        struct vd_chain c;
        if (vd_inflight_chain(q, q->resubmit_pos, &c, q->scratch, VD_MAX_IOV) < 0 || take(q, &c, 0) != 0)
            goto out;
        q->resubmit_pos++;
        budget--;
    }
    for (;;) {
        vd_ring_notify_enable(q, 0);
        for (;;) {
            int pending = vd_ring_pending(q);
            if (pending < 0)
                goto out;
            if (!pending)
                break;
            if (!budget) {
                /* A driver that keeps the ring full must not starve the other
                 * queues of this worker: yield, and be called again. */
                ret = VD_MORE;
                goto out;
            }
            for (; pending && budget; pending--, budget--) {
                vd_ring_prefetch_ahead(q, pending, PREFETCH_DESC, PREFETCH_BUF);
                struct vd_chain c;
                if (vd_ring_peek(q, &c, q->scratch, VD_MAX_IOV) < 0 || take(q, &c, 1) != 0)
                    goto out;
                vd_ring_advance(q, &c);
                if (++since_publish >= VD_USED_BATCH) {
                    /* Completions visible early (the driver may refill the
                     * ring while we work), one signal at the end. */
                    vd_ring_expose_used(q);
                    since_publish = 0;
                }
            }
        }
        if (quiet) {
            ret = VD_QUIET; /* the caller keeps looking at the ring (poll_us) */
            break;
        }
        if (!vd_queue_want_kick(q))
            break;
    }
out:
    if (q->dev->batch_done)
        q->dev->batch_done(q->dev->ctx, q);
    vd_ring_publish_used(q, batch_start);
    return ret;
}
