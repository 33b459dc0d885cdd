/* The L2 switch between net ports of this daemon: a MAC learning table
 * (fdb) with ageing, flooding of broadcast, multicast and unknown
 * destinations, never back out of the port a frame came from.  It moves
 * frames with net_deliver(): one copy, sender's buffers to receiver's. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "iov.h"
#include "net.h"

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
    /* Readers first: a worker takes it for reading while it holds an rx
     * queue (struct rx_hold) that another reader may be waiting for, so a
     * waiting writer must not hold new readers back.  Writers (attach,
     * detach) take no queue lock. */
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_READER_NP);
    pthread_rwlock_init(&sw->ports_lock, &attr);
    pthread_rwlockattr_destroy(&attr);
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
    uint64_t t = vd_now_ns();
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
    uint64_t t = vd_now_ns();
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

/* Flooding stops at the first fault in the source's memory (*src_fault set). */
void switch_forward(vd_net *src, int qp, const struct frame *f, struct rx_hold *hold, void **src_fault)
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
            net_deliver(to, qp % (to->active_pairs ? to->active_pairs : 1), f, hold, src_fault);
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
            net_deliver(to, pair, f, hold, src_fault);
        }
    }
    pthread_rwlock_unlock(&sw->ports_lock);
}
