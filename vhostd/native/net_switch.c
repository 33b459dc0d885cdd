/* The L2 switch between net ports of this daemon: a MAC learning table
 * (fdb) with ageing, flooding of broadcast, multicast and unknown
 * destinations, never back out of the port a frame came from.  It moves
 * frames with net_deliver(): one copy, sender's buffers to receiver's.
 *
 * The fdb is shared by every port and behind a lock, but a stream of
 * frames mostly repeats one source and one destination: each tx queue
 * pair remembers its last learn and lookup (struct sw_cache) and goes to
 * the table only when the MAC changes, the table changed (sw->gen), or a
 * second passed (the ageing keeps working). */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "iov.h"
#include "net.h"

#define SW_MAX_PORTS 1024
#define FDB_SIZE 4096
#define FDB_PROBE 16
#define AGEING_NS (300ull * 1000000000ull)
#define CACHE_NS 1000000000ull /* a remembered learn or lookup is redone after this */

struct fdb_entry {
    uint8_t mac[6];
    uint8_t used;
    int port;
    uint64_t seen;
};

/* The port table is read with no lock, frame after frame, by the workers;
 * the control plane changes it under ports_lock and, when a port goes,
 * waits one worker round (vd_engine_sync) before its device may be freed:
 * by then no worker still uses the pointer it read. */
struct vd_switch {
    uint64_t gen;                 /* bumped when an entry appears, moves or goes */
    pthread_mutex_t ports_lock;   /* writers of ports and top */
    struct vd_net *ports[SW_MAX_PORTS];
    int top;                      /* 1 + the highest port in use: floods look no further */
    pthread_mutex_t fdb_lock;
    struct fdb_entry fdb[FDB_SIZE];
};

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
    pthread_mutex_init(&sw->ports_lock, NULL);
    pthread_mutex_init(&sw->fdb_lock, NULL);
    return sw;
}

void vd_switch_free(vd_switch *sw)
{
    pthread_mutex_destroy(&sw->ports_lock);
    pthread_mutex_destroy(&sw->fdb_lock);
    free(sw);
}

static void changed(vd_switch *sw)
{
    __atomic_add_fetch(&sw->gen, 1, __ATOMIC_RELEASE);
}

/* Ageing needs no more than a coarse clock (a few ms, and cheaper). */
static uint64_t coarse_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void fdb_learn(vd_switch *sw, const uint8_t *mac, int port, uint64_t t)
{
    unsigned h = mac_hash(mac);
    pthread_mutex_lock(&sw->fdb_lock);
    struct fdb_entry *victim = NULL;
    for (int i = 0; i < FDB_PROBE; i++) {
        struct fdb_entry *e = &sw->fdb[(h + i) % FDB_SIZE];
        if (e->used && !memcmp(e->mac, mac, 6)) {
            if (e->port != port)
                changed(sw);
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
    changed(sw);
    memcpy(victim->mac, mac, 6);
    victim->used = 1;
    victim->port = port;
    victim->seen = t;
    pthread_mutex_unlock(&sw->fdb_lock);
}

static int fdb_lookup(vd_switch *sw, const uint8_t *mac, uint64_t t)
{
    unsigned h = mac_hash(mac);
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
    pthread_mutex_lock(&sw->ports_lock);
    int port = -1;
    for (int i = 0; i < SW_MAX_PORTS && port < 0; i++)
        if (!sw->ports[i])
            port = i;
    if (port >= 0) {
        net->sw_port = port;
        __atomic_store_n(&net->sw, sw, __ATOMIC_RELEASE);
        __atomic_store_n(&sw->ports[port], net, __ATOMIC_RELEASE);
        if (port >= sw->top)
            __atomic_store_n(&sw->top, port + 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&sw->ports_lock);
    return port;
}

/* From the control plane (the thread that frees devices); afterwards no
 * worker delivers into net or forwards from it. */
void vd_switch_detach(vd_switch *sw, vd_net *net)
{
    pthread_mutex_lock(&sw->ports_lock);
    __atomic_store_n(&net->sw, NULL, __ATOMIC_RELEASE);
    if (sw->ports[net->sw_port] == net)
        __atomic_store_n(&sw->ports[net->sw_port], NULL, __ATOMIC_RELEASE);
    while (sw->top > 0 && !sw->ports[sw->top - 1])
        __atomic_store_n(&sw->top, sw->top - 1, __ATOMIC_RELEASE);
    pthread_mutex_lock(&sw->fdb_lock);
    changed(sw);
    for (int i = 0; i < FDB_SIZE; i++)
        if (sw->fdb[i].used && sw->fdb[i].port == net->sw_port)
            sw->fdb[i].used = 0;
    pthread_mutex_unlock(&sw->fdb_lock);
    pthread_mutex_unlock(&sw->ports_lock);
    if (net->dev)
        vd_engine_sync(net->dev->engine);
}

/* The rx pair of port `to` that frames from tx pair qp go to. */
static int rx_pair(const vd_net *to, int qp)
{
    return qp % (to->active_pairs ? to->active_pairs : 1);
}

/* Flooding stops at the first fault in the source's memory (*src_fault set).
 * On a worker, or on the control plane (an injected frame, no hold), which
 * is also the only thread that detaches ports. */
void switch_forward(vd_net *src, int qp, const struct frame *f, struct rx_hold *hold, void **src_fault)
{
    vd_switch *sw = __atomic_load_n(&src->sw, __ATOMIC_ACQUIRE);
    if (!sw)
        return;
    uint8_t eth[12];
    if (f->iov[0].iov_len >= sizeof(eth))
        memcpy(eth, f->iov[0].iov_base, sizeof(eth));
    else
        vd_iov_read(f->iov, f->niov, 0, eth, sizeof(eth));
    const uint8_t *dst = eth, *from = eth + 6;
    /* A tx batch's pair has its cache (its worker's alone); a frame the
     * daemon injects (no hold) goes to the table. */
    struct sw_cache none = {0}, *c = hold ? &src->swc[qp] : &none;
    uint64_t now = !hold ? coarse_ns() : hold->now ? hold->now : (hold->now = coarse_ns());
    uint64_t gen = __atomic_load_n(&sw->gen, __ATOMIC_ACQUIRE);
    if (c->gen != gen) {
        c->gen = gen;
        c->learned = c->looked = 0;
    }
    if (!(from[0] & 1) && (memcmp(c->src, from, 6) || now - c->learned >= CACHE_NS)) {
        fdb_learn(sw, from, src->sw_port, now);
        memcpy(c->src, from, 6);
        c->learned = now;
        c->gen = __atomic_load_n(&sw->gen, __ATOMIC_ACQUIRE); /* our own change is known */
    }
    int port = -1;
    if (!(dst[0] & 1)) {
        if (c->looked && !memcmp(c->dst, dst, 6) && now - c->looked < CACHE_NS && c->gen == gen) {
            port = c->dst_port;
        } else {
            port = fdb_lookup(sw, dst, now);
            memcpy(c->dst, dst, 6);
            c->dst_port = port;
            c->looked = now;
        }
    }
    if (port >= 0) {
        vd_net *to = __atomic_load_n(&sw->ports[port], __ATOMIC_ACQUIRE);
        if (to && port != src->sw_port) /* never back out of its source port */
            net_deliver(to, rx_pair(to, qp), f, hold, src_fault);
    } else {
        int top = __atomic_load_n(&sw->top, __ATOMIC_ACQUIRE);
        for (int i = 0; i < top && !(src_fault && *src_fault); i++) {
            vd_net *to = __atomic_load_n(&sw->ports[i], __ATOMIC_ACQUIRE);
            if (!to || i == src->sw_port)
                continue;
            int pair = rx_pair(to, qp);
            if (!__atomic_load_n(&to->dev->q[2 * pair].started, __ATOMIC_RELAXED)) {
                /* No driver on that port (most ports of a big switch, most
                 * of the time): the drop net_deliver() would count, without
                 * taking its rx queue's lock.  A stale answer costs one
                 * frame, which flooding may always lose. */
                __atomic_add_fetch(&to->st[pair].rx_dropped, 1, __ATOMIC_RELAXED);
                continue;
            }
            net_deliver(to, pair, f, hold, src_fault);
        }
    }
}
