/* The driver side of virtio-blk queues, split or packed, for `vhostd bench
 * blk`.
 *
 * One thread (the caller's, GIL released by cffi) keeps `iodepth` requests
 * in flight on every queue.  The rings are guest-drivers/lib/virtq.c, the
 * guest programs' own virtqueue built here with -DVIRTQ_LIBC: each request
 * is a 3-descriptor chain (header, data, status) of its fixed slot, added
 * again when it completes, and everything the back-end hands back is
 * checked before use.  Notifications follow the spec both ways (EVENT_IDX,
 * the flags, or the packed event areas), so the back-end sees what a guest
 * driver would make it see.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "lg.h"
#include "virtq.h"

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define SLOT_BYTES 32
#define STATUS_AT 16
#define MAX_QUEUES 64
#define DRAIN_NS 5000000000ull

uint64_t lg_magic(void)
{
    return 0x474c4454534f4856ull; /* "VHOSTDLG" */
}

/* Latency histogram, log-linear: 16 sub-buckets per power of two of ns.
 * Fixed size, no allocation per request; error below 1/16. */
#define SUB_BITS 4
#define NBUCKETS (64 << SUB_BITS)
static unsigned bucket_of(uint64_t ns)
{
    if (ns < (1u << SUB_BITS))
        return (unsigned)ns;
    unsigned msb = 63 - __builtin_clzll(ns);
    unsigned sub = (unsigned)(ns >> (msb - SUB_BITS)) & ((1u << SUB_BITS) - 1);
    return ((msb - SUB_BITS + 1) << SUB_BITS) | sub;
}
static double bucket_mid(unsigned b)
{
    if (b < (1u << SUB_BITS))
        return b;
    unsigned msb = (b >> SUB_BITS) + SUB_BITS - 1;
    uint64_t lo = ((uint64_t)((1u << SUB_BITS) | (b & ((1u << SUB_BITS) - 1)))) << (msb - SUB_BITS);
    return lo + (double)(1ull << (msb - SUB_BITS)) / 2;
}

struct q {
    struct lg_queue *l;
    struct virtq vq;
    void *state;             /* the queue's private state (virtq_sizes) */
    uint64_t cursor, rng;
    uint64_t *submitted;     /* per slot: submit time (ns) */
    uint32_t inflight;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static int setup_queue(struct q *q, const struct lg_params *p, int index, struct lg_result *r)
{
    struct lg_queue *l = q->l;
    struct virtq_sizes sz;
    virtq_sizes(l->num, p->packed, 0, &sz);
    q->state = calloc(1, sz.state);
    q->submitted = calloc(p->iodepth, sizeof(uint64_t));
    if (!q->state || !q->submitted)
        return -ENOMEM;
    struct virtq_mem m = {.desc = l->desc, .desc_gpa = l->desc_gpa, .driver = l->avail, .driver_gpa = l->avail_gpa,
                          .device = l->used, .device_gpa = l->used_gpa, .state = q->state};
    unsigned flags = (p->packed ? VIRTQ_F_PACKED : 0) | (p->event_idx ? VIRTQ_F_EVENT_IDX : 0);
    if (virtq_init(&q->vq, (uint16_t)index, l->num, flags, 0, &m) < 0) {
        snprintf(r->error, sizeof(r->error), "%s", q->vq.error);
        return -EINVAL;
    }
    return 0;
}

static uint64_t next_offset(struct q *q, const struct lg_params *p)
{
    uint64_t blocks = p->capacity / p->bs;
    if (p->random)
        return (xorshift(&q->rng) % blocks) * p->bs;
    uint64_t off = q->cursor;
    q->cursor = (q->cursor + p->bs) % (blocks * p->bs);
    return off;
}

/* Fill slot s with a new request and add its chain (not yet published). */
static int submit(struct q *q, const struct lg_params *p, uint32_t s, uint64_t t)
{
    uint8_t *hdr = q->l->slots + SLOT_BYTES * s;
    uint32_t type = p->write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, ioprio = 0;
    uint64_t off = next_offset(q, p), sector = off / 512;
    memcpy(hdr, &type, 4);
    memcpy(hdr + 4, &ioprio, 4);
    memcpy(hdr + 8, &sector, 8);
    hdr[STATUS_AT] = 0xff;
    if (p->write) {
        uint8_t *data = q->l->data + (uint64_t)p->bs * s;
        uint64_t magic = lg_magic();
        for (uint32_t o = 0; o < p->bs; o += 512) {
            uint64_t where = off + o;
            memcpy(data + o, &magic, 8);
            memcpy(data + o + 8, &where, 8);
        }
    }
    uint64_t slot = q->l->slots_gpa + SLOT_BYTES * s;
    struct vq_buf b[3] = {{slot, 16}, {q->l->data_gpa + (uint64_t)p->bs * s, p->bs}, {slot + STATUS_AT, 1}};
    int n_out = p->write ? 2 : 1;
    if (virtq_add(&q->vq, b, n_out, 3 - n_out, (void *)(uintptr_t)(s + 1)) < 0)
        return -1; /* the ring holds iodepth chains: only when it broke */
    q->submitted[s] = t;
    q->inflight++;
    return 0;
}

/* Publish the new chains and kick if the back-end asked for it. */
static void publish(struct q *q, struct lg_result *r)
{
    if (virtq_kick_prepare(&q->vq)) {
        uint64_t one = 1;
        if (write(q->l->kick_fd, &one, 8) == 8)
            r->kicks++;
    }
}

/* Take completions; resubmit each slot unless stopping.  Returns how many,
 * or -1 when the back-end broke the ring. */
static int reap(struct q *q, const struct lg_params *p, struct lg_result *r, uint64_t *hist, int resubmit)
{
    int n = 0, got;
    uint64_t t = 0;
    void *cookie;
    while ((got = virtq_poll(&q->vq, &cookie, NULL)) == 1) {
        uint32_t s = (uint32_t)((uintptr_t)cookie - 1); /* ours: the queue checked the id */
        if (!t)
            t = now_ns();
        hist[bucket_of(t - q->submitted[s])]++;
        if (q->l->slots[SLOT_BYTES * s + STATUS_AT] != 0)
            r->errors++;
        r->ios++;
        r->bytes += p->bs;
        q->inflight--;
        n++;
        if (resubmit && submit(q, p, s, t) < 0)
            return -1;
    }
    return got < 0 ? -1 : n;
}

static void wait_calls(struct q *qs, int nq)
{
    struct pollfd pfd[MAX_QUEUES];
    for (int i = 0; i < nq; i++)
        pfd[i] = (struct pollfd){.fd = qs[i].l->call_fd, .events = POLLIN};
    if (poll(pfd, nq, 100) > 0) {
        for (int i = 0; i < nq; i++) {
            uint64_t v;
            if (pfd[i].revents & POLLIN && read(pfd[i].fd, &v, 8) < 0) {
            }
        }
    }
}

int lg_run(const struct lg_params *p, struct lg_queue *lqs, int nq, struct lg_result *r)
{
    memset(r, 0, sizeof(*r));
    if (nq < 1 || nq > MAX_QUEUES || p->bs == 0 || p->bs % 512 || p->capacity < p->bs || p->iodepth == 0)
        return -EINVAL;
    struct q qs[MAX_QUEUES];
    memset(qs, 0, sizeof(qs[0]) * nq);
    uint64_t *hist = calloc(NBUCKETS, sizeof(uint64_t));
    if (!hist)
        return -ENOMEM;
    int rc = 0;
    for (int i = 0; i < nq; i++) {
        qs[i].l = &lqs[i];
        qs[i].rng = p->seed * 2654435761u + i + 1;
        qs[i].cursor = p->capacity / p->bs / nq * i * p->bs;
        if (3u * p->iodepth > lqs[i].num) {
            rc = -EINVAL;
            goto out;
        }
        rc = setup_queue(&qs[i], p, i, r);
        if (rc)
            goto out;
    }
    uint64_t start = now_ns(), deadline = start + (uint64_t)(p->seconds * 1e9);
    for (int i = 0; i < nq; i++) {
        if (p->poll)
            virtq_disable_intr(&qs[i].vq);
        else
            virtq_enable_intr(&qs[i].vq);
        for (uint32_t s = 0; s < p->iodepth; s++)
            submit(&qs[i], p, s, start);
        publish(&qs[i], r);
    }
    int broken = -1; /* the queue that broke */
    for (;;) {
        unsigned got = 0;
        for (int i = 0; i < nq; i++) {
            int n = reap(&qs[i], p, r, hist, 1);
            if (n < 0) {
                broken = i;
                goto stop;
            }
            got += (unsigned)n;
            publish(&qs[i], r);
        }
        if (got == 0 && now_ns() >= deadline)
            break;
        if (got || p->poll)
            continue;
        if (now_ns() >= deadline)
            break;
        /* Nothing done: ask for a call, look once more (the back-end may
         * have completed in between), then sleep until it comes. */
        int ready = 0;
        for (int i = 0; i < nq; i++)
            ready |= virtq_enable_intr(&qs[i].vq);
        if (!ready) {
            r->waits++;
            wait_calls(qs, nq);
        }
    }
    r->elapsed = (now_ns() - start) / 1e9;
    /* Stop: let what is in flight come back (not counted as new work). */
    uint64_t ios = r->ios, bytes = r->bytes;
    uint64_t drain_end = now_ns() + DRAIN_NS;
    r->drained = 1;
    for (int i = 0; i < nq; i++) {
        while (qs[i].inflight) {
            int n = reap(&qs[i], p, r, hist, 0);
            if (n < 0) {
                broken = i;
                break;
            }
            if (!n) {
                if (now_ns() > drain_end) {
                    r->drained = 0;
                    break;
                }
                usleep(50);
            }
        }
    }
    r->ios = ios;
    r->bytes = bytes;
stop:
    if (broken >= 0) {
        if (!r->elapsed)
            r->elapsed = (now_ns() - start) / 1e9;
        r->drained = 0;
        snprintf(r->error, sizeof(r->error), "%s", qs[broken].vq.error);
        rc = -EPROTO;
    }
out:
    if (r->ios || r->drained) {
        uint64_t total = 0, seen = 0;
        for (unsigned b = 0; b < NBUCKETS; b++)
            total += hist[b];
        double *targets[] = {&r->p50_us, &r->p99_us};
        double fr[] = {0.50, 0.99};
        int t = 0;
        for (unsigned b = 0; b < NBUCKETS && total; b++) {
            seen += hist[b];
            while (t < 2 && seen >= fr[t] * total)
                *targets[t++] = bucket_mid(b) / 1000.0;
            if (hist[b])
                r->max_us = bucket_mid(b) / 1000.0;
        }
    }
    for (int i = 0; i < nq; i++) {
        free(qs[i].submitted);
        free(qs[i].state);
    }
    free(hist);
    return rc;
}
