/* Fake virtio-mmio devices for the hosted tests: virtio-blk on a RAM disk,
 * virtio-net as loopback, sink, or one port of a two-port switch shared by
 * two forked processes.  Written from the virtio 1.2 spec, strict on
 * purpose: the driver under test must follow the rules, not just work.
 * Rings are split (2.7) or, when the driver accepts VIRTIO_F_RING_PACKED,
 * packed (2.8): then chains are read from consecutive ring positions, every
 * descriptor must be marked available for its lap, buffer ids must not be
 * in flight twice, and used descriptors go back in batches whose first
 * flags are written last. */
#define _GNU_SOURCE
#include "fakedev.h"

#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MAXDEV 16
#define MAXQ 8
#define MAXSEG 256

#define ST_ACK 1
#define ST_DRIVER 2
#define ST_DRIVER_OK 4
#define ST_FEATURES_OK 8
#define ST_NEEDS_RESET 0x40
#define ST_FAILED 0x80

#define F_INDIRECT (1ull << 28)
#define F_EVENT_IDX (1ull << 29)
#define F_VERSION_1 (1ull << 32)
#define F_RING_PACKED (1ull << 34)

#define D_NEXT 1
#define D_WRITE 2
#define D_INDIRECT 4
#define P_AVAIL (1 << 7)
#define P_USED (1 << 15)
#define EV_ENABLE 0
#define EV_DISABLE 1
#define EV_DESC 2

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct pdesc {
    uint64_t addr;
    uint32_t len;
    uint16_t id;
    uint16_t flags;
};

struct fq {
    uint32_t num_max, num, ready;
    uint64_t desc, drv, dev;
    uint16_t last_avail, used_idx; /* packed: last_avail is a ring position, used_idx counts used entries */
    uint16_t isr_acked; /* used_idx at the last InterruptACK of bit 0 */
    int packed;
    uint16_t avail_wrap, used_pos, used_wrap; /* packed */
    uint8_t *id_busy;   /* packed: buffer ids with the device */
    int batch_open;     /* packed: used descriptors written, the first one's flags not yet */
    uint16_t batch_pos, batch_flags;
    int broken;
    atomic_int kick;
    unsigned long notifies, chains;
};

struct fdev {
    uint64_t base;
    uint32_t id;
    uint64_t feat, drv_feat;
    uint32_t feat_sel, drv_feat_sel, status, qsel, gen;
    struct fq q[MAXQ];
    int nq;
    uint8_t config[64];
    /* blk */
    uint8_t *disk;
    uint64_t sectors;
    int ro;
    char serial[20];
    unsigned long reads, writes, flushes, get_ids, zeroes, errors, unsupported;
    /* net */
    int net_mode; /* 0 loopback, 1 switch, 2 sink */
    unsigned long tx_frames, rx_frames, rx_dropped;
};

enum { NET_LOOPBACK, NET_SWITCH, NET_SINK };

static struct fdev devs[MAXDEV];
static int ndev;
static uint64_t ram_lo, ram_hi;
static struct fake_opts opts;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static atomic_ulong violations;

/* ------------------------------------------------------------ switch */

#define SW_SLOTS 512
struct sw_frame {
    uint32_t len;
    uint8_t data[1514];
};
struct sw_inbox {
    pthread_mutex_t m;
    uint32_t head, tail; /* head: next to read */
    unsigned long dropped;
    struct sw_frame f[SW_SLOTS];
};
static struct sw_inbox *sw; /* sw[0], sw[1] in shared memory */
static int sw_port = -1;

void fake_switch_create(void)
{
    sw = mmap(NULL, 2 * sizeof(struct sw_inbox), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sw == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    for (int i = 0; i < 2; i++) {
        pthread_mutexattr_t a;
        pthread_mutexattr_init(&a);
        pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        pthread_mutex_init(&sw[i].m, &a);
    }
}

void fake_switch_port(int port)
{
    sw_port = port;
}

static void sw_send(const uint8_t *frame, uint32_t len)
{
    struct sw_inbox *in = &sw[1 - sw_port];
    pthread_mutex_lock(&in->m);
    if (in->tail - in->head < SW_SLOTS) {
        struct sw_frame *f = &in->f[in->tail % SW_SLOTS];
        f->len = len;
        memcpy(f->data, frame, len);
        in->tail++;
    } else {
        in->dropped++;
    }
    pthread_mutex_unlock(&in->m);
}

/* ------------------------------------------------------------ helpers */

static void violation(struct fdev *d, struct fq *q, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void violation(struct fdev *d, struct fq *q, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    fprintf(stderr, "FAKEDEV VIOLATION dev@0x%lx%s: %s\n", (unsigned long)d->base, q ? " (queue broken)" : "", msg);
    atomic_fetch_add(&violations, 1);
    if (q) {
        q->broken = 1;
        d->status |= ST_NEEDS_RESET;
    }
}

unsigned long fake_violations(void)
{
    return atomic_load(&violations);
}

static void *ptr(uint64_t addr, uint64_t len)
{
    if (addr < ram_lo || addr >= ram_hi || len > ram_hi - addr)
        return NULL;
    return (void *)(uintptr_t)addr;
}

static uint16_t load16(const void *p)
{
    return atomic_load_explicit((_Atomic uint16_t *)p, memory_order_acquire);
}

static void store16(void *p, uint16_t v)
{
    atomic_store_explicit((_Atomic uint16_t *)p, v, memory_order_release);
}

static uint16_t *avail_ring(struct fq *q) { return (uint16_t *)(uintptr_t)(q->drv + 4); }
static uint16_t *avail_idx(struct fq *q) { return (uint16_t *)(uintptr_t)(q->drv + 2); }
static uint16_t *used_flags(struct fq *q) { return (uint16_t *)(uintptr_t)(q->dev); }
static uint16_t *used_idx(struct fq *q) { return (uint16_t *)(uintptr_t)(q->dev + 2); }
static uint32_t *used_ring(struct fq *q) { return (uint32_t *)(uintptr_t)(q->dev + 4); }
static uint16_t *avail_event(struct fq *q) { return (uint16_t *)(uintptr_t)(q->dev + 4 + 8ull * q->num); }
/* packed: the ring and the two event suppression areas (off_wrap, flags) */
static struct pdesc *pring(struct fq *q) { return (struct pdesc *)(uintptr_t)q->desc; }
static uint16_t *drv_event(struct fq *q) { return (uint16_t *)(uintptr_t)q->drv; }
static uint16_t *dev_event(struct fq *q) { return (uint16_t *)(uintptr_t)q->dev; }
static int pavail(uint16_t flags, uint16_t wrap)
{
    return !!(flags & P_AVAIL) == wrap && !!(flags & P_USED) != wrap;
}

struct iov {
    uint8_t *p;
    uint32_t len;
};

struct chain {
    uint16_t head;  /* split: head descriptor; packed: buffer id */
    uint16_t ndesc; /* packed: ring descriptors it took */
    int nout, nin;
    uint64_t out_bytes, in_bytes;
    struct iov out[MAXSEG], in[MAXSEG];
};

static int add_seg(struct fdev *d, struct fq *q, struct chain *c, const struct desc *e)
{
    if (e->len == 0) {
        violation(d, q, "descriptor of length 0");
        return -1;
    }
    uint8_t *p = ptr(e->addr, e->len);
    if (!p) {
        violation(d, q, "buffer 0x%lx+%u outside guest RAM", (unsigned long)e->addr, e->len);
        return -1;
    }
    if (e->flags & D_WRITE) {
        if (c->nin == MAXSEG)
            goto too_many;
        c->in[c->nin++] = (struct iov){p, e->len};
        c->in_bytes += e->len;
    } else {
        if (c->nin) {
            violation(d, q, "device-readable descriptor after a writable one");
            return -1;
        }
        if (c->nout == MAXSEG)
            goto too_many;
        c->out[c->nout++] = (struct iov){p, e->len};
        c->out_bytes += e->len;
    }
    return 0;
too_many:
    violation(d, q, "more than %d segments", MAXSEG);
    return -1;
}

/* Walk the chain at `head` strictly (spec 2.7.5, 2.7.6). */
static int walk(struct fdev *d, struct fq *q, uint16_t head, struct chain *c)
{
    memset(c, 0, offsetof(struct chain, out));
    c->head = head;
    if (head >= q->num) {
        violation(d, q, "head %u >= queue size %u", head, q->num);
        return -1;
    }
    struct desc *table = ptr(q->desc, 16ull * q->num);
    uint32_t i = head, seen = 0;
    for (;;) {
        struct desc e = table[i];
        if (++seen > q->num) {
            violation(d, q, "descriptor chain longer than the queue (loop)");
            return -1;
        }
        if (e.flags & D_INDIRECT) {
            if (!(d->drv_feat & F_INDIRECT)) {
                violation(d, q, "INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC");
                return -1;
            }
            if (e.flags & D_NEXT) {
                violation(d, q, "INDIRECT and NEXT both set");
                return -1;
            }
            if (e.len == 0 || e.len % 16) {
                violation(d, q, "indirect table length %u", e.len);
                return -1;
            }
            struct desc *t = ptr(e.addr, e.len);
            if (!t) {
                violation(d, q, "indirect table outside guest RAM");
                return -1;
            }
            uint32_t n = e.len / 16, j = 0, cnt = 0;
            for (;;) {
                struct desc f = t[j];
                if (++cnt > n) {
                    violation(d, q, "indirect chain loops");
                    return -1;
                }
                if (f.flags & D_INDIRECT) {
                    violation(d, q, "nested INDIRECT descriptor");
                    return -1;
                }
                if (add_seg(d, q, c, &f) < 0)
                    return -1;
                if (!(f.flags & D_NEXT))
                    break;
                if (f.next >= n) {
                    violation(d, q, "indirect next %u >= %u entries", f.next, n);
                    return -1;
                }
                j = f.next;
            }
            return 0; /* an indirect descriptor ends the chain */
        }
        if (add_seg(d, q, c, &e) < 0)
            return -1;
        if (!(e.flags & D_NEXT))
            return 0;
        if (e.next >= q->num) {
            violation(d, q, "next %u >= queue size %u", e.next, q->num);
            return -1;
        }
        i = e.next;
    }
}

static void iov_copy_from(const struct iov *v, int n, uint64_t off, uint8_t *dst, uint64_t len)
{
    for (int i = 0; i < n && len; i++) {
        if (off >= v[i].len) {
            off -= v[i].len;
            continue;
        }
        uint64_t c = v[i].len - off < len ? v[i].len - off : len;
        memcpy(dst, v[i].p + off, c);
        dst += c;
        len -= c;
        off = 0;
    }
}

static void iov_copy_to(const struct iov *v, int n, uint64_t off, const uint8_t *src, uint64_t len)
{
    for (int i = 0; i < n && len; i++) {
        if (off >= v[i].len) {
            off -= v[i].len;
            continue;
        }
        uint64_t c = v[i].len - off < len ? v[i].len - off : len;
        memcpy(v[i].p + off, src, c);
        src += c;
        len -= c;
        off = 0;
    }
}

/* A chain taken and not yet used: what push_used needs of it. */
struct taken {
    uint16_t id, ndesc;
};

static void push_used(struct fq *q, struct taken c, uint32_t len)
{
    q->used_idx++;
    if (!q->packed) {
        uint32_t *e = used_ring(q) + 2 * ((uint16_t)(q->used_idx - 1) % q->num);
        e[0] = c.id;
        e[1] = len;
        return;
    }
    struct pdesc *e = &pring(q)[q->used_pos];
    uint16_t flags = q->used_wrap ? (P_AVAIL | P_USED) : 0;
    e->id = c.id;
    e->len = len;
    if (!q->batch_open) { /* written last, by publish_used: the whole batch at once (2.8.21.1) */
        q->batch_open = 1;
        q->batch_pos = q->used_pos;
        q->batch_flags = flags;
    } else {
        store16(&e->flags, flags);
    }
    q->id_busy[c.id] = 0;
    uint32_t next = q->used_pos + c.ndesc;
    if (next >= q->num) {
        next -= q->num;
        q->used_wrap ^= 1;
    }
    q->used_pos = (uint16_t)next;
}

static void publish_used(struct fdev *d, struct fq *q)
{
    if (!q->packed) {
        store16(used_idx(q), q->used_idx);
        return;
    }
    if (q->batch_open) {
        store16(&pring(q)[q->batch_pos].flags, q->batch_flags);
        q->batch_open = 0;
    }
    /* what the driver asks for must be a defined value (2.8.10) */
    uint16_t f = load16(drv_event(q) + 1);
    if (f > EV_DESC || (f == EV_DESC && !(d->drv_feat & F_EVENT_IDX)))
        violation(d, NULL, "driver event suppression flags %u%s", f, f == EV_DESC ? " without EVENT_IDX" : "");
}

/* Next available head, or -1 (none, or the queue broke). */
static int pop_avail(struct fdev *d, struct fq *q)
{
    if (q->broken || !q->ready)
        return -1;
    uint16_t idx = load16(avail_idx(q));
    if ((uint16_t)(idx - q->last_avail) > q->num) {
        violation(d, q, "avail idx %u is %u ahead of %u (queue size %u)", idx, (uint16_t)(idx - q->last_avail),
                  q->last_avail, q->num);
        return -1;
    }
    if (idx == q->last_avail)
        return -1;
    uint16_t head = load16(avail_ring(q) + q->last_avail % q->num);
    q->last_avail++;
    return head;
}

/* packed: the chain at last_avail, if the driver made it available (2.8.6,
 * 2.8.7): its descriptors are consecutive, each marked available for its own
 * lap (as the spec's driver example does), the buffer id is in the last, an
 * INDIRECT descriptor stands alone and its table's entries carry only
 * WRITE.  1: a chain in c; 0: none; -1: the queue broke. */
static int pop_packed(struct fdev *d, struct fq *q, struct chain *c)
{
    struct pdesc *ring = pring(q);
    uint16_t pos = q->last_avail, wrap = q->avail_wrap, at = pos;
    if (!pavail(load16(&ring[pos].flags), wrap))
        return 0;
    atomic_thread_fence(memory_order_acquire);
    memset(c, 0, offsetof(struct chain, out));
    uint32_t n = 0;
    uint16_t id;
    for (;;) {
        struct pdesc e = ring[pos];
        if (n && !pavail(e.flags, wrap)) {
            violation(d, q, "descriptor %u of the chain at %u is not marked available (flags 0x%x, wrap %u)", pos, at,
                      e.flags, wrap);
            return -1;
        }
        if (++n > q->num) {
            violation(d, q, "chain at %u longer than the ring", at);
            return -1;
        }
        if (++pos == q->num) {
            pos = 0;
            wrap ^= 1;
        }
        if (e.flags & D_INDIRECT) {
            if (!(d->drv_feat & F_INDIRECT)) {
                violation(d, q, "INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC");
                return -1;
            }
            if (n != 1 || (e.flags & D_NEXT)) {
                violation(d, q, "INDIRECT descriptor %s", n != 1 ? "inside a chain" : "with NEXT");
                return -1;
            }
            if (e.len == 0 || e.len % 16) {
                violation(d, q, "indirect table length %u", e.len);
                return -1;
            }
            struct pdesc *t = ptr(e.addr, e.len);
            if (!t) {
                violation(d, q, "indirect table outside guest RAM");
                return -1;
            }
            for (uint32_t j = 0; j < e.len / 16; j++) {
                struct pdesc f = t[j];
                if (f.flags & ~D_WRITE) {
                    violation(d, q, "indirect entry %u has flags 0x%x (only WRITE is valid)", j, f.flags);
                    return -1;
                }
                if (add_seg(d, q, c, &(struct desc){f.addr, f.len, f.flags, 0}) < 0)
                    return -1;
            }
            id = e.id;
            break;
        }
        if (add_seg(d, q, c, &(struct desc){e.addr, e.len, e.flags, 0}) < 0)
            return -1;
        if (!(e.flags & D_NEXT)) {
            id = e.id;
            break;
        }
    }
    if (id >= q->num || q->id_busy[id]) {
        violation(d, q, "chain at %u: buffer id %u %s", at, id, id >= q->num ? "beyond the ring" : "already in flight");
        return -1;
    }
    q->id_busy[id] = 1;
    c->head = id;
    c->ndesc = (uint16_t)n;
    q->last_avail = pos;
    q->avail_wrap = wrap;
    return 1;
}

/* The next available chain, walked into c: 1, 0 if none, -1 if the queue broke. */
static int pop_chain(struct fdev *d, struct fq *q, struct chain *c)
{
    if (q->broken || !q->ready)
        return q->broken ? -1 : 0;
    if (q->packed)
        return pop_packed(d, q, c);
    int h = pop_avail(d, q);
    if (h < 0)
        return q->broken ? -1 : 0;
    return walk(d, q, (uint16_t)h, c) < 0 ? -1 : 1;
}

/* Where the driver's side of a queue is, to take back chains not used. */
struct mark {
    uint16_t last_avail, avail_wrap;
};

static struct mark mark(const struct fq *q) { return (struct mark){q->last_avail, q->avail_wrap}; }

static void give_back(struct fq *q, struct mark m, const uint16_t *ids, int n)
{
    q->last_avail = m.last_avail;
    q->avail_wrap = m.avail_wrap;
    if (q->packed)
        for (int i = 0; i < n; i++)
            q->id_busy[ids[i]] = 0;
}

/* Anything available at all (after re-arming notifications)? */
static int more_avail(struct fq *q)
{
    if (q->packed)
        return pavail(load16(&pring(q)[q->last_avail].flags), q->avail_wrap);
    return load16(avail_idx(q)) != q->last_avail;
}

/* ------------------------------------------------------------ blk */

static void blk_chain(struct fdev *d, struct fq *q, struct chain *c, uint32_t *used_len)
{
    *used_len = 0;
    if (c->in_bytes < 1 || c->out_bytes < 16) {
        violation(d, q, "blk request without header (%lu readable) or status (%lu writable)",
                  (unsigned long)c->out_bytes, (unsigned long)c->in_bytes);
        return;
    }
    struct {
        uint32_t type, reserved;
        uint64_t sector;
    } h;
    iov_copy_from(c->out, c->nout, 0, (uint8_t *)&h, 16);
    uint64_t out_data = c->out_bytes - 16, in_data = c->in_bytes - 1;
    uint8_t st = 0;
    uint32_t used = 1;
    switch (h.type) {
    case 0: /* IN */
        if (in_data % 512 || out_data || h.sector > d->sectors || in_data / 512 > d->sectors - h.sector) {
            st = 1;
            break;
        }
        {
            /* skip the header bytes in the readable part: data is all writable */
            iov_copy_to(c->in, c->nin, 0, d->disk + h.sector * 512, in_data);
        }
        used += (uint32_t)in_data;
        d->reads++;
        break;
    case 1: /* OUT */
        if (d->ro || out_data % 512 || in_data || h.sector > d->sectors || out_data / 512 > d->sectors - h.sector) {
            st = 1;
            break;
        }
        iov_copy_from(c->out, c->nout, 16, d->disk + h.sector * 512, out_data);
        d->writes++;
        break;
    case 4:
        d->flushes++;
        break;
    case 8: {
        uint64_t n = in_data < 20 ? in_data : 20;
        iov_copy_to(c->in, c->nin, 0, (const uint8_t *)d->serial, n);
        used += (uint32_t)n;
        d->get_ids++;
        break;
    }
    case 13: /* WRITE_ZEROES */
        if (out_data == 0 || out_data % 16) {
            st = 2;
            break;
        }
        for (uint64_t off = 0; off < out_data; off += 16) {
            struct {
                uint64_t sector;
                uint32_t num, flags;
            } s;
            iov_copy_from(c->out, c->nout, 16 + off, (uint8_t *)&s, 16);
            if (s.sector > d->sectors || s.num > d->sectors - s.sector) {
                st = 1;
                break;
            }
            memset(d->disk + s.sector * 512, 0, s.num * 512ull);
        }
        d->zeroes++;
        break;
    default:
        st = 2;
        break;
    }
    if (st == 1)
        d->errors++;
    if (st == 2)
        d->unsupported++;
    c->in[c->nin - 1].p[c->in[c->nin - 1].len - 1] = st;
    *used_len = used;
}

/* ------------------------------------------------------------ net */

static struct fdev *net_rx_target(struct fdev *d) { return d; }

/* deliver a frame into d's rx queue (queue 0); drops like vhostd when the
 * driver is not ready or has no buffer */
static void net_deliver(struct fdev *d, const uint8_t *frame, uint32_t len)
{
    struct fq *q = &d->q[0];
    if (!(d->status & ST_DRIVER_OK) || q->broken || !q->ready) {
        d->rx_dropped++;
        return;
    }
    int mrg = (d->feat & d->drv_feat & (1ull << 15)) != 0;
    uint8_t hdr[12] = {0};
    uint64_t total = 12 + len, done = 0;
    struct taken bufs[64];
    uint16_t ids[64];
    uint32_t lens[64];
    int nb = 0;
    struct mark saved = mark(q);
    uint8_t *nbuf_at = NULL;
    while (done < total) {
        if (nb == 64 || (nb && !mrg))
            goto drop;
        struct chain c;
        int got = pop_chain(d, q, &c);
        if (got < 0)
            return;
        if (got == 0)
            goto drop;
        bufs[nb] = (struct taken){c.head, c.ndesc};
        ids[nb] = c.head;
        if (c.nout) {
            violation(d, q, "rx buffer with device-readable descriptors");
            return;
        }
        uint64_t room = c.in_bytes;
        if (mrg && opts.mrg_rxbuf > 1 && room > 700)
            room = 700; /* force frames over several buffers */
        uint64_t put = 0;
        if (done < 12) {
            uint64_t hcount = 12 - done < room ? 12 - done : room;
            iov_copy_to(c.in, c.nin, 0, hdr + done, hcount);
            if (done == 0) {
                if (c.in[0].len < 12) {
                    violation(d, q, "rx header split over descriptors (allowed, but not by this fake)");
                    return;
                }
                nbuf_at = c.in[0].p + 10;
            }
            put = hcount;
        }
        uint64_t fcount = total - done - put < room - put ? total - done - put : room - put;
        iov_copy_to(c.in, c.nin, put, frame + (done + put - 12), fcount);
        put += fcount;
        lens[nb] = (uint32_t)put;
        nb++;
        done += put;
    }
    if (mrg && nbuf_at) {
        nbuf_at[0] = (uint8_t)nb;
        nbuf_at[1] = (uint8_t)(nb >> 8);
    }
    for (int i = 0; i < nb; i++)
        push_used(q, bufs[i], lens[i]);
    publish_used(d, q);
    d->rx_frames++;
    return;
drop:
    give_back(q, saved, ids, nb);
    d->rx_dropped++;
}

static void net_tx_chain(struct fdev *d, struct fq *q, struct chain *c)
{
    if (c->nin) {
        violation(d, q, "tx chain with writable descriptors");
        return;
    }
    if (c->out_bytes < 12 + 14 || c->out_bytes > 12 + 1514) {
        violation(d, q, "tx chain of %lu bytes", (unsigned long)c->out_bytes);
        return;
    }
    uint8_t buf[12 + 1514];
    iov_copy_from(c->out, c->nout, 0, buf, c->out_bytes);
    for (int i = 0; i < 10; i++)
        if (buf[i]) {
            violation(d, NULL, "tx header byte %d is 0x%02x with no offload negotiated", i, buf[i]);
            break;
        }
    d->tx_frames++;
    uint32_t len = (uint32_t)(c->out_bytes - 12);
    if (d->net_mode == NET_LOOPBACK)
        net_deliver(net_rx_target(d), buf + 12, len);
    else if (d->net_mode == NET_SWITCH)
        sw_send(buf + 12, len);
}

/* ------------------------------------------------------------ queue service */

/* Kicks: "no notifications while we are at it" (on 0) and the re-arm (on 1):
 * split the NO_NOTIFY flag or avail_event, packed the device event area
 * (ENABLE/DISABLE, or with EVENT_IDX a descriptor event at the next
 * position we look at). */
static void want_kicks(struct fdev *d, struct fq *q, int on)
{
    int event_idx = (d->drv_feat & F_EVENT_IDX) != 0;
    if (q->packed) {
        if (on && event_idx) {
            store16(dev_event(q), (uint16_t)(q->last_avail | q->avail_wrap << 15));
            store16(dev_event(q) + 1, EV_DESC);
        } else if (!event_idx) {
            store16(dev_event(q) + 1, on ? EV_ENABLE : EV_DISABLE);
        }
    } else if (event_idx) {
        if (on)
            store16(avail_event(q), q->last_avail);
    } else {
        store16(used_flags(q), on ? 0 : 1);
    }
}

static void service_queue(struct fdev *d, struct fq *q)
{
    want_kicks(d, q, 0);
    for (;;) {
        struct taken batch[1024];
        uint32_t lens[1024];
        int n = 0, got = 0;
        struct chain *c = malloc(sizeof(*c));
        while (n < 1024 && (got = pop_chain(d, q, c)) > 0) {
            q->chains++;
            uint32_t used = 0;
            if (d->id == 2)
                blk_chain(d, q, c, &used);
            else
                net_tx_chain(d, q, c);
            if (q->broken)
                break;
            batch[n] = (struct taken){c->head, c->ndesc};
            lens[n++] = used;
        }
        free(c);
        if (got < 0 || q->broken)
            return;
        if (n) {
            for (int i = 0; i < n; i++) {
                int k = opts.reorder && d->id == 2 ? n - 1 - i : i;
                push_used(q, batch[k], lens[k]);
            }
            publish_used(d, q);
        }
        /* re-arm notifications, then look again (the driver may have added
         * something after our last look and before seeing the re-arm) */
        want_kicks(d, q, 1);
        atomic_thread_fence(memory_order_seq_cst);
        if (!more_avail(q))
            return;
        want_kicks(d, q, 0);
    }
}

static void *device_thread(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&lock);
    for (;;) {
        int busy = 0;
        for (int i = 0; i < ndev; i++) {
            struct fdev *d = &devs[i];
            if (!(d->status & ST_DRIVER_OK) || (d->status & ST_NEEDS_RESET)) {
                for (int k = 0; k < d->nq; k++)
                    atomic_store(&d->q[k].kick, 0);
            } else {
                for (int k = 0; k < d->nq; k++)
                    if (atomic_exchange(&d->q[k].kick, 0) && d->q[k].ready && !d->q[k].broken) {
                        if (d->id == 1 && k == 0)
                            continue; /* rx: buffers are used when frames come */
                        service_queue(d, &d->q[k]);
                        busy = 1;
                    }
            }
            if (d->id == 1 && d->net_mode == NET_SWITCH && sw) {
                struct sw_inbox *in = &sw[sw_port];
                pthread_mutex_lock(&in->m);
                while (in->head != in->tail) {
                    struct sw_frame *f = &in->f[in->head % SW_SLOTS];
                    net_deliver(d, f->data, f->len);
                    in->head++;
                    busy = 1;
                }
                pthread_mutex_unlock(&in->m);
            }
        }
        if (!busy) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 200000;
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            pthread_cond_timedwait(&wake, &lock, &ts);
        }
    }
    return NULL;
}

/* ------------------------------------------------------------ registers */

static struct fdev *find(uint64_t addr)
{
    for (int i = 0; i < ndev; i++)
        if (addr >= devs[i].base && addr < devs[i].base + 0x1000)
            return &devs[i];
    fprintf(stderr, "FAKEDEV: access to 0x%lx, no device there\n", (unsigned long)addr);
    abort();
}

static void reset(struct fdev *d)
{
    d->status = 0;
    d->drv_feat = 0;
    d->feat_sel = d->drv_feat_sel = d->qsel = 0;
    for (int i = 0; i < d->nq; i++) {
        struct fq *q = &d->q[i];
        q->num = q->num_max;
        q->ready = 0;
        q->desc = q->drv = q->dev = 0;
        q->last_avail = q->used_idx = q->isr_acked = 0;
        q->packed = 0;
        q->avail_wrap = q->used_wrap = 1;
        q->used_pos = 0;
        q->batch_open = 0;
        free(q->id_busy);
        q->id_busy = NULL;
        q->broken = 0;
        atomic_store(&q->kick, 0);
    }
}

uint32_t hosted_mmio_read(uint64_t addr, int size)
{
    pthread_mutex_lock(&lock);
    struct fdev *d = find(addr);
    uint32_t off = (uint32_t)(addr - d->base), v = 0;
    if (off >= 0x100) {
        off -= 0x100;
        if (off + size <= sizeof(d->config))
            memcpy(&v, d->config + off, size);
        pthread_mutex_unlock(&lock);
        return v;
    }
    if (size != 4 || off % 4)
        violation(d, NULL, "register 0x%x read with size %d", off, size);
    struct fq *q = d->qsel < (uint32_t)d->nq ? &d->q[d->qsel] : NULL;
    switch (off) {
    case 0x000: v = 0x74726976; break;
    case 0x004: v = 2; break;
    case 0x008: v = d->id; break;
    case 0x00c: v = 0x46414b45; break;
    case 0x010: v = d->feat_sel < 2 ? (uint32_t)(d->feat >> (32 * d->feat_sel)) : 0; break;
    case 0x034: v = q ? q->num_max : 0; break;
    case 0x044: v = q ? q->ready : 0; break;
    case 0x060: /* bit 0: used buffers since the last InterruptACK */
        v = 0;
        for (int i = 0; i < d->nq; i++)
            if (d->q[i].used_idx != d->q[i].isr_acked)
                v = 1;
        break;
    case 0x070: v = d->status; break;
    case 0x0fc: v = d->gen; break;
    default: violation(d, NULL, "read of register 0x%x", off); break;
    }
    pthread_mutex_unlock(&lock);
    return v;
}

void hosted_mmio_write(uint64_t addr, int size, uint32_t v)
{
    struct fdev *d;
    pthread_mutex_lock(&lock);
    d = find(addr);
    uint32_t off = (uint32_t)(addr - d->base);
    if (size != 4 || off % 4 || off >= 0x100)
        violation(d, NULL, "register 0x%x written with size %d", off, size);
    struct fq *q = d->qsel < (uint32_t)d->nq ? &d->q[d->qsel] : NULL;
    int queue_reg = off == 0x038 || off == 0x044 || (off >= 0x080 && off <= 0x0a4);
    if (queue_reg) {
        if (!q) {
            violation(d, NULL, "queue register 0x%x with QueueSel %u (no such queue)", off, d->qsel);
            goto out;
        }
        if (!(d->status & ST_FEATURES_OK) || (d->status & ST_DRIVER_OK))
            violation(d, NULL, "queue register 0x%x written with status 0x%x", off, d->status);
        if (q->ready && off != 0x044)
            violation(d, NULL, "queue %u register 0x%x written while the queue is ready", d->qsel, off);
    }
    switch (off) {
    case 0x014: d->feat_sel = v; break;
    case 0x020:
        if (d->status & ST_FEATURES_OK)
            violation(d, NULL, "DriverFeatures written after FEATURES_OK");
        if (d->drv_feat_sel < 2) {
            d->drv_feat &= ~(0xffffffffull << (32 * d->drv_feat_sel));
            d->drv_feat |= (uint64_t)v << (32 * d->drv_feat_sel);
        }
        break;
    case 0x024: d->drv_feat_sel = v; break;
    case 0x030: d->qsel = v; break;
    case 0x038: /* a packed ring need not be a power of two (2.8) */
        if (v == 0 || v > q->num_max || (!(d->drv_feat & F_RING_PACKED) && (v & (v - 1))))
            violation(d, NULL, "QueueNum %u (max %u)", v, q->num_max);
        q->num = v;
        break;
    case 0x044:
        if (v) {
            int packed = (d->drv_feat & F_RING_PACKED) != 0;
            /* packed: descriptor ring, then two 4-byte event areas (2.8.10) */
            uint64_t drv_len = packed ? 4 : 6 + 2ull * q->num, dev_len = packed ? 4 : 6 + 8ull * q->num;
            struct desc *t = ptr(q->desc, 16ull * q->num);
            if (!t || !ptr(q->drv, drv_len) || !ptr(q->dev, dev_len) || q->desc % 16 || q->drv % (packed ? 4 : 2) ||
                q->dev % 4)
                violation(d, NULL, "queue %u: %s rings outside RAM or misaligned", d->qsel, packed ? "packed" : "split");
            q->packed = packed;
            q->avail_wrap = q->used_wrap = 1;
            q->last_avail = q->used_pos = 0;
            q->batch_open = 0;
            free(q->id_busy);
            q->id_busy = calloc(q->num, 1);
        }
        q->ready = v;
        break;
    case 0x050:
        if (v >= (uint32_t)d->nq) {
            violation(d, NULL, "QueueNotify %u: no such queue", v);
            break;
        }
        if (!(d->status & ST_DRIVER_OK) && !(d->id == 1 && v == 0))
            violation(d, NULL, "QueueNotify %u before DRIVER_OK", v);
        d->q[v].notifies++;
        atomic_store(&d->q[v].kick, 1);
        pthread_cond_signal(&wake);
        break;
    case 0x064:
        if (v & 1)
            for (int i = 0; i < d->nq; i++)
                d->q[i].isr_acked = d->q[i].used_idx;
        break;
    case 0x070:
        if (v == 0) {
            reset(d);
            break;
        }
        if ((v & d->status) != d->status)
            violation(d, NULL, "status 0x%x clears bits of 0x%x without a reset", v, d->status);
        if ((v & ST_FEATURES_OK) && !(d->status & ST_FEATURES_OK)) {
            if ((d->drv_feat & ~d->feat) || !(d->drv_feat & F_VERSION_1)) {
                v &= ~ST_FEATURES_OK; /* refuse */
            }
        }
        if ((v & ST_DRIVER_OK) && !(v & ST_FEATURES_OK))
            violation(d, NULL, "DRIVER_OK without FEATURES_OK");
        d->status = v | (d->status & ST_NEEDS_RESET);
        break;
    case 0x080: q->desc = (q->desc & ~0xffffffffull) | v; break;
    case 0x084: q->desc = (q->desc & 0xffffffffull) | (uint64_t)v << 32; break;
    case 0x090: q->drv = (q->drv & ~0xffffffffull) | v; break;
    case 0x094: q->drv = (q->drv & 0xffffffffull) | (uint64_t)v << 32; break;
    case 0x0a0: q->dev = (q->dev & ~0xffffffffull) | v; break;
    case 0x0a4: q->dev = (q->dev & 0xffffffffull) | (uint64_t)v << 32; break;
    default: violation(d, NULL, "write of register 0x%x", off); break;
    }
out:
    pthread_mutex_unlock(&lock);
}

/* ------------------------------------------------------------ set-up */

void fake_init(uint64_t lo, uint64_t hi, const struct fake_opts *o)
{
    ram_lo = lo;
    ram_hi = hi;
    opts = *o;
}

static struct fdev *new_dev(uint32_t id, int nq)
{
    struct fdev *d = &devs[ndev];
    d->base = 0xd0000000ull + 0x1000ull * ndev;
    ndev++;
    d->id = id;
    d->nq = nq;
    d->feat = F_VERSION_1 | (opts.event_idx ? F_EVENT_IDX : 0) | (opts.indirect ? F_INDIRECT : 0) |
              (opts.packed ? F_RING_PACKED : 0);
    for (int i = 0; i < nq; i++) {
        d->q[i].num_max = d->q[i].num = opts.queue_max;
        d->q[i].avail_wrap = d->q[i].used_wrap = 1;
    }
    return d;
}

uint64_t fake_add_blk(uint64_t sectors, int readonly, const char *serial)
{
    int nq = opts.blk_queues ? (int)opts.blk_queues : 1;
    struct fdev *d = new_dev(2, nq);
    d->disk = calloc(sectors, 512);
    d->sectors = sectors;
    d->ro = readonly;
    memcpy(d->serial, serial, strnlen(serial, sizeof(d->serial))); /* not NUL-terminated when 20 long */
    /* SEG_MAX, BLK_SIZE, WRITE_ZEROES, and RO or FLUSH */
    d->feat |= (1ull << 2) | (1ull << 6) | (1ull << 14) | (readonly ? 1ull << 5 : 1ull << 9);
    if (nq > 1)
        d->feat |= 1ull << 12;
    if (opts.size_max)
        d->feat |= 1ull << 1;
    memcpy(d->config + 0, &sectors, 8);
    memcpy(d->config + 8, &opts.size_max, 4);
    uint32_t seg_max = opts.queue_max - 2, blk_size = 512;
    memcpy(d->config + 12, &seg_max, 4);
    memcpy(d->config + 20, &blk_size, 4);
    uint16_t nqc = (uint16_t)nq;
    memcpy(d->config + 34, &nqc, 2);
    return d->base;
}

uint64_t fake_add_net(const char *mode, const uint8_t mac[6])
{
    struct fdev *d = new_dev(1, 2);
    d->net_mode = strcmp(mode, "switch") == 0 ? NET_SWITCH : strcmp(mode, "sink") == 0 ? NET_SINK : NET_LOOPBACK;
    d->feat |= (1ull << 16); /* STATUS */
    if (opts.net_mac)
        d->feat |= 1ull << 5;
    if (opts.mrg_rxbuf)
        d->feat |= 1ull << 15;
    memcpy(d->config, mac, 6);
    uint16_t status = 1;
    memcpy(d->config + 6, &status, 2);
    return d->base;
}

void fake_start(void)
{
    pthread_t t;
    if (pthread_create(&t, NULL, device_thread, NULL)) {
        perror("pthread_create");
        exit(2);
    }
    pthread_detach(t);
}

void fake_summary(void)
{
    pthread_mutex_lock(&lock);
    for (int i = 0; i < ndev; i++) {
        struct fdev *d = &devs[i];
        fprintf(stderr, "fakedev %d: id=%u status=0x%x drv_features=0x%lx", i, d->id, d->status,
                (unsigned long)d->drv_feat);
        if (d->id == 2)
            fprintf(stderr, " reads=%lu writes=%lu flushes=%lu get_ids=%lu zeroes=%lu errors=%lu unsupp=%lu", d->reads,
                    d->writes, d->flushes, d->get_ids, d->zeroes, d->errors, d->unsupported);
        else
            fprintf(stderr, " tx=%lu rx=%lu rx_dropped=%lu", d->tx_frames, d->rx_frames, d->rx_dropped);
        for (int k = 0; k < d->nq; k++)
            fprintf(stderr, " q%d:chains=%lu,notifies=%lu%s", k, d->q[k].chains, d->q[k].notifies,
                    d->q[k].broken ? ",BROKEN" : "");
        fprintf(stderr, "\n");
    }
    fprintf(stderr, "fakedev: violations=%lu\n", fake_violations());
    pthread_mutex_unlock(&lock);
}
