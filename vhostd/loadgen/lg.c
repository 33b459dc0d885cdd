/* The driver side of virtio-blk split queues, for `vhostd bench blk`.
 *
 * One thread (the caller's, GIL released by cffi) keeps `iodepth` requests
 * in flight on every queue: each slot is a fixed 3-descriptor chain (header,
 * data, status) so a completion only needs a new offset and an avail entry.
 * Notifications follow the spec both ways (EVENT_IDX or the flags), so the
 * back-end sees what a guest driver would make it see.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "lg.h"

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1
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
    uint16_t avail_idx, last_used, kicked_at;
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

static inline uint16_t rd16(const void *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE); }
static inline void wr16(void *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE); }

static inline uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void put_desc(struct q *q, unsigned i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
    uint8_t *d = q->l->desc + 16 * i;
    memcpy(d, &addr, 8);
    memcpy(d + 8, &len, 4);
    memcpy(d + 12, &flags, 2);
    memcpy(d + 14, &next, 2);
}

/* The fixed chains: slot s owns descriptors 3s, 3s+1, 3s+2. */
static void build_chains(struct q *q, const struct lg_params *p)
{
    for (uint32_t s = 0; s < p->iodepth; s++) {
        unsigned d = 3 * s;
        put_desc(q, d, q->l->slots_gpa + SLOT_BYTES * s, 16, DESC_F_NEXT, d + 1);
        put_desc(q, d + 1, q->l->data_gpa + (uint64_t)p->bs * s, p->bs, DESC_F_NEXT | (p->write ? 0 : DESC_F_WRITE),
                 d + 2);
        put_desc(q, d + 2, q->l->slots_gpa + SLOT_BYTES * s + STATUS_AT, 1, DESC_F_WRITE, 0);
    }
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

/* Fill slot s with a new request and put it on the avail ring (not yet published). */
static void submit(struct q *q, const struct lg_params *p, uint32_t s, uint64_t t)
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
    uint16_t head = (uint16_t)(3 * s);
    memcpy(q->l->avail + 4 + 2 * (q->avail_idx % q->l->num), &head, 2);
    q->avail_idx++;
    q->submitted[s] = t;
    q->inflight++;
}

static inline int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

/* Publish the new avail entries and kick if the back-end asked for it. */
static void publish(struct q *q, const struct lg_params *p, struct lg_result *r)
{
    uint16_t old = rd16(q->l->avail + 2);
    if (old == q->avail_idx)
        return;
    wr16(q->l->avail + 2, q->avail_idx);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* idx before reading the back-end's suppression state */
    int kick;
    if (p->event_idx)
        kick = need_event(rd16(q->l->used + 4 + 8 * q->l->num), q->avail_idx, old);
    else
        kick = !(rd16(q->l->used) & USED_F_NO_NOTIFY);
    if (kick) {
        uint64_t one = 1;
        if (write(q->l->kick_fd, &one, 8) == 8)
            r->kicks++;
    }
}

/* Ask for (or refuse) a call for the next completion. */
static void want_interrupt(struct q *q, const struct lg_params *p, int on)
{
    if (p->event_idx)
        wr16(q->l->avail + 4 + 2 * q->l->num, on ? q->last_used : (uint16_t)(q->last_used - 1));
    else
        wr16(q->l->avail, on ? 0 : AVAIL_F_NO_INTERRUPT);
}

/* Take completions; resubmit each slot unless stopping.  Returns how many. */
static unsigned reap(struct q *q, const struct lg_params *p, struct lg_result *r, uint64_t *hist, int resubmit)
{
    uint16_t used_idx = rd16(q->l->used + 2);
    unsigned n = 0;
    uint64_t t = 0;
    while (q->last_used != used_idx) {
        uint32_t id;
        memcpy(&id, q->l->used + 4 + 8 * (q->last_used % q->l->num), 4);
        q->last_used++;
        uint32_t s = id / 3;
        if (id % 3 || s >= p->iodepth) { /* a back-end bug; count it and lose the slot */
            r->errors++;
            continue;
        }
        if (!t)
            t = now_ns();
        hist[bucket_of(t - q->submitted[s])]++;
        if (q->l->slots[SLOT_BYTES * s + STATUS_AT] != 0)
            r->errors++;
        r->ios++;
        r->bytes += p->bs;
        q->inflight--;
        n++;
        if (resubmit)
            submit(q, p, s, t);
    }
    return n;
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
    uint64_t *hist = calloc(NBUCKETS, sizeof(uint64_t));
    if (!hist)
        return -ENOMEM;
    int rc = 0;
    for (int i = 0; i < nq; i++) {
        if (3u * p->iodepth > lqs[i].num) {
            rc = -EINVAL;
            nq = i;
            goto out;
        }
        qs[i] = (struct q){.l = &lqs[i], .rng = p->seed * 2654435761u + i + 1,
                           .cursor = p->capacity / p->bs / nq * i * p->bs};
        qs[i].submitted = calloc(p->iodepth, sizeof(uint64_t));
        if (!qs[i].submitted) {
            rc = -ENOMEM;
            nq = i;
            goto out;
        }
        build_chains(&qs[i], p);
    }
    uint64_t start = now_ns(), deadline = start + (uint64_t)(p->seconds * 1e9);
    for (int i = 0; i < nq; i++) {
        want_interrupt(&qs[i], p, !p->poll);
        for (uint32_t s = 0; s < p->iodepth; s++)
            submit(&qs[i], p, s, start);
        publish(&qs[i], p, r);
    }
    for (;;) {
        unsigned got = 0;
        for (int i = 0; i < nq; i++) {
            got += reap(&qs[i], p, r, hist, 1);
            publish(&qs[i], p, r);
        }
        if (got == 0 && now_ns() >= deadline)
            break;
        if (got || p->poll)
            continue;
        if (now_ns() >= deadline)
            break;
        /* Nothing done: ask for a call, look once more (the back-end may
         * have completed in between), then sleep until it comes. */
        for (int i = 0; i < nq; i++)
            want_interrupt(&qs[i], p, 1);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        int ready = 0;
        for (int i = 0; i < nq; i++)
            ready |= rd16(qs[i].l->used + 2) != qs[i].last_used;
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
            if (!reap(&qs[i], p, r, hist, 0)) {
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
    for (int i = 0; i < nq; i++)
        free(qs[i].submitted);
    free(hist);
    return rc;
}
