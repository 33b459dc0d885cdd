/* Unit test of the virtqueue (lib/virtq.c) in both layouts, hosted: a
 * scripted device in the same thread takes what the driver published,
 * checks every chain against what was added, and completes chains in
 * random order.  Covers index and wrap-counter wrap-around (> 65536
 * operations), the free lists, indirect tables, ring memory whose device
 * addresses differ from the driver's pointers (as in vhostd's load
 * generator), the notification decision against the device's suppression
 * state, used-buffer notification requests, and the detection of impossible
 * used entries. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "rt.h"
#include "virtio_mmio.h"
#include "virtq.h"
#undef main
#undef exit
#undef printf

static unsigned long notifies;

void hosted_outb(u16 port, u8 v)
{
    if (port == UART_PORT)
        fputc(v, stdout);
}
void hosted_outl(u16 port, u32 v)
{
    if (port == EXIT_PORT) {
        fflush(stdout);
        fprintf(stderr, "test-virtq: guest exit(%u)\n", v);
        _exit(1);
    }
}
u8 hosted_inb(u16 port)
{
    (void)port;
    return 0;
}
u32 hosted_mmio_read(u64 a, int s)
{
    (void)a, (void)s;
    return 0;
}
void hosted_mmio_write(u64 a, int s, u32 v)
{
    (void)a, (void)s, (void)v;
    notifies++;
}

#define CHECK(c, ...)                                                                                                  \
    do {                                                                                                               \
        if (!(c)) {                                                                                                    \
            fprintf(stderr, "test-virtq: FAIL %s:%d: %s: ", __FILE__, __LINE__, #c);                                  \
            fprintf(stderr, __VA_ARGS__);                                                                              \
            fprintf(stderr, "\n");                                                                                     \
            exit(1);                                                                                                   \
        }                                                                                                              \
    } while (0)

/* Chains are described by a token: its buffer count, how many are
 * readable, addresses and lengths all follow from it, so the device side
 * can check what it walks and the driver side what it gets back. */
static int tok_n(u64 t) { return 1 + (int)(mix64(t) % 5); }
static int tok_out(u64 t) { return (int)(mix64(t ^ 0xabc) % (u64)(tok_n(t) + 1)); }
static u64 tok_addr(u64 t, int i) { return (t << 16) | (u64)i; }
static u32 tok_len(u64 t, int i) { return (u32)(100 + (t % 7) + (u64)i); }
static u32 tok_used_len(u64 t) /* what the device says it wrote: half the writable bytes */
{
    u32 in = 0;
    for (int i = tok_out(t); i < tok_n(t); i++)
        in += tok_len(t, i);
    return in / 2;
}

struct pending {
    u16 id, ndesc;
    u32 len;
};

/* The scripted device. */
struct sdev {
    struct virtq *q;
    u64 delta;            /* device address = driver pointer + delta */
    u16 last_avail;       /* split: avail index; packed: ring position */
    u16 avail_wrap;       /* packed */
    u16 used_pos, used_wrap; /* packed */
    u16 used_idx;         /* split */
    u64 chains_seen;
    u64 avail_lin;        /* packed: descriptors taken, as one count */
    struct pending *held;
    int nheld;
    u8 *held_ids;         /* id is with the device */
};

static void *dptr(struct sdev *v, u64 addr) { return (void *)(uintptr_t)(addr - v->delta); }

/* Check one buffer of a chain against its token. */
static void check_buf(u64 token, int k, u64 addr, u32 len, int writable)
{
    CHECK(k < tok_n(token), "token %lu: more than %d buffers", (unsigned long)token, tok_n(token));
    CHECK(addr == tok_addr(token, k), "buffer %d of token %lu: addr 0x%lx", k, (unsigned long)token,
          (unsigned long)addr);
    CHECK(len == tok_len(token, k), "buffer %d: len %u", k, len);
    CHECK(writable == (k >= tok_out(token)), "buffer %d: write flag", k);
}

static void hold(struct sdev *v, u16 id, u16 ndesc, u64 token)
{
    CHECK(id < v->q->size && !v->held_ids[id], "id %u handed out twice (or beyond the ring)", id);
    v->held_ids[id] = 1;
    v->held[v->nheld++] = (struct pending){id, ndesc, tok_used_len(token)};
    v->chains_seen++;
}

/* split: take one published chain; 0 if none */
static int take_split(struct sdev *v)
{
    struct virtq *q = v->q;
    u16 avail = q->avail->idx;
    CHECK((u16)(avail - v->last_avail) <= q->size, "avail ran %u ahead", (u16)(avail - v->last_avail));
    if (avail == v->last_avail)
        return 0;
    u16 head = q->avail->ring[v->last_avail % q->size];
    v->last_avail++;
    CHECK(head < q->size, "head %u", head);
    struct vring_desc *t = q->desc;
    u32 n = q->size, i = head;
    if (t[head].flags & VRING_DESC_F_INDIRECT) {
        CHECK(!(t[head].flags & VRING_DESC_F_NEXT), "INDIRECT with NEXT");
        n = t[head].len / 16;
        CHECK(n >= 2 && n <= q->indirect_max && t[head].len % 16 == 0, "indirect len %u", t[head].len);
        t = dptr(v, t[head].addr);
        i = 0;
    }
    u64 token = t[i].addr >> 16;
    int k = 0;
    for (;;) {
        CHECK(i < n, "next %u out of range", i);
        check_buf(token, k++, t[i].addr, t[i].len, !!(t[i].flags & VRING_DESC_F_WRITE));
        if (!(t[i].flags & VRING_DESC_F_NEXT))
            break;
        i = t[i].next;
    }
    CHECK(k == tok_n(token), "chain of token %lu has %d buffers, expected %d", (unsigned long)token, k, tok_n(token));
    hold(v, head, 0, token);
    return 1;
}

static int avail_at(u16 flags, u16 wrap)
{
    return !!(flags & VRING_PACKED_DESC_F_AVAIL) == wrap && !!(flags & VRING_PACKED_DESC_F_USED) != wrap;
}

/* packed: take the chain at our position if the driver made it available */
static int take_packed(struct sdev *v)
{
    struct virtq *q = v->q;
    struct vring_packed_desc *ring = q->pdesc;
    if (!avail_at(ring[v->last_avail].flags, v->avail_wrap))
        return 0;
    u64 token = 0;
    int k = 0;
    u16 ndesc = 0, id;
    for (;;) {
        struct vring_packed_desc d = ring[v->last_avail];
        /* every descriptor of the chain is marked for its own lap */
        CHECK(avail_at(d.flags, v->avail_wrap), "descriptor %u of a chain not available (flags 0x%x)",
              v->last_avail, d.flags);
        ndesc++;
        CHECK(ndesc <= q->size, "chain longer than the ring");
        if (++v->last_avail == q->size) {
            v->last_avail = 0;
            v->avail_wrap ^= 1;
        }
        v->avail_lin++;
        if (d.flags & VRING_DESC_F_INDIRECT) {
            CHECK(ndesc == 1 && !(d.flags & VRING_DESC_F_NEXT), "INDIRECT inside a chain or with NEXT");
            u32 n = d.len / 16;
            CHECK(d.len % 16 == 0 && n >= 2 && n <= q->indirect_max, "indirect len %u", d.len);
            struct vring_packed_desc *t = dptr(v, d.addr);
            token = t[0].addr >> 16;
            for (u32 i = 0; i < n; i++) {
                CHECK((t[i].flags & ~VRING_DESC_F_WRITE) == 0, "indirect entry %u flags 0x%x", i, t[i].flags);
                check_buf(token, k++, t[i].addr, t[i].len, !!(t[i].flags & VRING_DESC_F_WRITE));
            }
            id = d.id;
            break;
        }
        if (k == 0)
            token = d.addr >> 16;
        check_buf(token, k++, d.addr, d.len, !!(d.flags & VRING_DESC_F_WRITE));
        if (!(d.flags & VRING_DESC_F_NEXT)) {
            id = d.id; /* the last descriptor carries the buffer id */
            break;
        }
    }
    CHECK(k == tok_n(token), "chain of token %lu has %d buffers, expected %d", (unsigned long)token, k, tok_n(token));
    hold(v, id, ndesc, token);
    return 1;
}

static void take_all(struct sdev *v)
{
    while (v->q->packed ? take_packed(v) : take_split(v))
        ;
    CHECK(v->chains_seen <= v->q->pub_seq, "the device saw %lu chains, only %u published",
          (unsigned long)v->chains_seen, v->q->pub_seq);
}

/* Complete `count` held chains in random order, as one batch: packed, the
 * batch's first flags are written last. */
static void complete(struct sdev *v, int count)
{
    struct virtq *q = v->q;
    u16 first_pos = v->used_pos, first_flags = 0;
    for (int c = 0; c < count; c++) {
        int pick = rand() % v->nheld;
        struct pending p = v->held[pick];
        v->held[pick] = v->held[--v->nheld];
        if (p.id < q->size)
            v->held_ids[p.id] = 0;
        if (q->packed) {
            struct vring_packed_desc *d = &q->pdesc[v->used_pos];
            u16 f = v->used_wrap ? (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED) : 0;
            d->id = p.id;
            d->len = p.len;
            if (c == 0)
                first_flags = f;
            else
                d->flags = f;
            u32 next = v->used_pos + p.ndesc;
            if (next >= q->size) {
                next -= q->size;
                v->used_wrap ^= 1;
            }
            v->used_pos = (u16)next;
        } else {
            q->used->ring[v->used_idx % q->size].id = p.id;
            q->used->ring[v->used_idx % q->size].len = p.len;
            v->used_idx++;
        }
    }
    if (count && q->packed)
        __atomic_store_n(&q->pdesc[first_pos].flags, first_flags, __ATOMIC_RELEASE);
    if (!q->packed)
        __atomic_store_n(&q->used->idx, v->used_idx, __ATOMIC_RELEASE);
}

/* The device's wish for notifications, and what the driver must then do
 * for descriptors published in [old, new) (counted from the start: split
 * avail entries, packed descriptors). */
struct suppress {
    int mode; /* 0 notify, 1 never, 2 at event */
    u64 event;
};

static void set_suppression(struct sdev *v, struct suppress *s)
{
    struct virtq *q = v->q;
    s->mode = rand() % (q->event_idx ? 3 : 2);
    if (q->packed) {
        /* as devices do: the position they will look at next */
        s->event = v->avail_lin;
        u16 pos = (u16)(s->event % q->size), wrap = ((s->event / q->size) & 1) ^ 1;
        q->device_event->off_wrap = (u16)(pos | wrap << 15);
        q->device_event->flags = s->mode == 0 ? VRING_EVENT_F_ENABLE
                                 : s->mode == 1 ? VRING_EVENT_F_DISABLE
                                                : VRING_EVENT_F_DESC;
    } else if (q->event_idx) {
        s->mode = 2; /* with EVENT_IDX only avail_event counts */
        s->event = v->chains_seen + (u64)(rand() % 3);
        *(u16 *)((u8 *)q->used + 4 + 8ull * q->size) = (u16)s->event;
    } else {
        q->used->flags = s->mode == 1 ? VRING_USED_F_NO_NOTIFY : 0;
    }
}

static int expect_kick(const struct virtq *q, const struct suppress *s, u64 old, u64 new)
{
    if (new == old || s->mode == 1)
        return 0;
    if (s->mode == 0 || (q->packed && new - old >= q->size))
        return 1;
    return s->event >= old && s->event < new;
}

/* Memory whose device addresses are the pointers + delta (delta 0: the
 * guest allocator, identity). */
static void setup(struct virtq *q, u16 size, unsigned flags, u16 indirect_max, u64 delta)
{
    if (!delta) {
        virtq_alloc(q, 0, size, flags, indirect_max);
        return;
    }
    struct virtq_sizes s;
    virtq_sizes(size, flags & VIRTQ_F_PACKED, indirect_max, &s);
    struct virtq_mem m = {0};
    m.desc = aligned_alloc(4096, ALIGN_UP(s.desc, 4096));
    m.driver = aligned_alloc(64, ALIGN_UP(s.driver, 64));
    m.device = aligned_alloc(64, ALIGN_UP(s.device, 64));
    m.indirect = indirect_max ? aligned_alloc(64, ALIGN_UP(s.indirect, 64)) : NULL;
    m.state = aligned_alloc(64, ALIGN_UP(s.state, 64));
    memset(m.desc, 0, s.desc);
    memset(m.driver, 0, s.driver);
    memset(m.device, 0, s.device);
    if (m.indirect)
        memset(m.indirect, 0, s.indirect);
    memset(m.state, 0, s.state);
    m.desc_gpa = (u64)(uintptr_t)m.desc + delta;
    m.driver_gpa = (u64)(uintptr_t)m.driver + delta;
    m.device_gpa = (u64)(uintptr_t)m.device + delta;
    m.indirect_gpa = m.indirect ? (u64)(uintptr_t)m.indirect + delta : 0;
    CHECK(virtq_init(q, 0, size, flags, indirect_max, &m) == 0, "virtq_init: %s", q->error);
    CHECK(q->desc_gpa == m.desc_gpa && q->driver_gpa == m.driver_gpa && q->device_gpa == m.device_gpa, "gpas");
}

static void run(u16 size, unsigned flags, u16 indirect_max, unsigned long ops, unsigned seed, u64 delta)
{
    struct virtq q;
    setup(&q, size, flags, indirect_max, delta);
    struct vdev dev = {.base = 0xd0000000, .name = "test"};
    q.dev = &dev;
    int packed = !!(flags & VIRTQ_F_PACKED), event_idx = !!(flags & VIRTQ_F_EVENT_IDX);
    CHECK(q.size && (q.size & (q.size - 1)) == 0 && q.packed == packed && q.event_idx == event_idx, "size %u",
          q.size);
    srand(seed);
    struct sdev v = {.q = &q, .delta = delta, .avail_wrap = 1, .used_wrap = 1};
    v.held = calloc(q.size, sizeof(*v.held));
    v.held_ids = calloc(q.size, 1);
    unsigned long added = 0, completed = 0, kicks = 0;
    u64 token = 1, added_lin = 0, kick_old = 0;
    unsigned long kicks_before = notifies;
    struct suppress sup = {0, 0};
    set_suppression(&v, &sup);
    while (completed < ops) {
        /* driver: add a few chains */
        int adds = rand() % 4;
        for (int a = 0; a < adds; a++) {
            int n = tok_n(token), n_out = tok_out(token);
            struct vq_buf b[8];
            for (int i = 0; i < n; i++) {
                b[i].addr = tok_addr(token, i);
                b[i].len = tok_len(token, i);
            }
            if (virtq_descs_needed(&q, n) > q.size) {
                token++; /* can never fit this ring */
                continue;
            }
            if (!virtq_has_room(&q, n)) {
                CHECK(virtq_add(&q, b, n_out, n - n_out, (void *)(uintptr_t)token) == -1, "add without room");
                break;
            }
            u16 free_before = q.num_free;
            int id = virtq_add(&q, b, n_out, n - n_out, (void *)(uintptr_t)token);
            CHECK(id >= 0 && id < q.size, "add returned %d", id);
            CHECK(free_before - q.num_free == virtq_descs_needed(&q, n), "descriptors taken");
            token++;
            added++;
            added_lin += packed ? (u64)virtq_descs_needed(&q, n) : 1;
        }
        /* the device must not see what is not published yet */
        if (rand() % 4 == 0)
            take_all(&v);
        if (rand() % 3 == 0) {
            int need = virtq_kick(&q), want = expect_kick(&q, &sup, kick_old, added_lin);
            CHECK(need == want, "notify decision %d, expected %d (mode %d event %lu old %lu new %lu)", need, want,
                  sup.mode, (unsigned long)sup.event, (unsigned long)kick_old, (unsigned long)added_lin);
            kick_old = added_lin;
            kicks += need;
        } else {
            virtq_publish(&q);
        }
        /* device: take what is published, complete some in random order */
        take_all(&v);
        set_suppression(&v, &sup);
        int completes = v.nheld ? rand() % (v.nheld + 1) : 0;
        while (completes) {
            int batch = 1 + rand() % completes;
            complete(&v, batch);
            completes -= batch;
        }
        /* driver: reap; the used length must be the one for its token */
        void *cookie;
        u32 len;
        int r;
        while ((r = virtq_poll(&q, &cookie, &len)) == 1) {
            u64 t = (u64)(uintptr_t)cookie;
            CHECK(t && t < token, "bad cookie %lu", (unsigned long)t);
            CHECK(len == tok_used_len(t), "token %lu: used len %u", (unsigned long)t, len);
            completed++;
        }
        CHECK(r == 0, "poll returned %d: %s", r, q.error);
        CHECK(q.num_free <= q.size, "num_free %u > size", q.num_free);
        if (packed)
            CHECK(q.driver_event->flags == VRING_EVENT_F_DISABLE, "driver event flags %u", q.driver_event->flags);
        else if (event_idx)
            CHECK((u16)(q.avail->ring[q.size] - q.last_used) >= 0x4000 &&
                      (u16)(q.avail->ring[q.size] - q.last_used) <= 0x8000,
                  "used_event not kept ahead");
        else
            CHECK(q.avail->flags == VRING_AVAIL_F_NO_INTERRUPT, "NO_INTERRUPT not set");
    }
    /* drain everything and check the free lists are whole again */
    virtq_publish(&q);
    take_all(&v);
    while (v.nheld)
        complete(&v, v.nheld);
    while (virtq_poll(&q, 0, 0) == 1)
        completed++;
    CHECK(q.num_free == q.size && q.inflight == 0, "after drain: num_free=%u inflight=%u", q.num_free, q.inflight);
    u8 *seen = calloc(q.size, 1);
    u16 d = q.free_head;
    for (u16 i = 0; i < q.size; i++) {
        CHECK(d < q.size && !seen[d], "free list broken at %u (d=%u)", i, d);
        seen[d] = 1;
        d = q.links[d];
    }
    CHECK(added == completed, "added %lu completed %lu", added, completed);
    if (packed)
        CHECK(q.last_used == v.used_pos && q.used_wrap == v.used_wrap && q.next_avail == v.last_avail,
              "positions: driver used %u/%u avail %u, device used %u/%u avail %u", q.last_used, q.used_wrap,
              q.next_avail, v.used_pos, v.used_wrap, v.last_avail);
    else
        CHECK(q.last_used == v.used_idx, "last_used %u used_idx %u", q.last_used, v.used_idx);
    CHECK(added > 70000 || ops < 70000, "too few operations to wrap the 16-bit indices");

    /* asking for a used-buffer notification */
    CHECK(virtq_enable_intr(&q) == 0, "nothing is waiting");
    if (packed && event_idx)
        CHECK(q.driver_event->flags == VRING_EVENT_F_DESC &&
                  q.driver_event->off_wrap == (u16)(q.last_used | q.used_wrap << 15),
              "driver event %u/0x%x", q.driver_event->flags, q.driver_event->off_wrap);
    else if (packed)
        CHECK(q.driver_event->flags == VRING_EVENT_F_ENABLE, "driver event flags %u", q.driver_event->flags);
    else if (event_idx)
        CHECK(q.avail->ring[q.size] == q.last_used, "used_event %u", q.avail->ring[q.size]);
    else
        CHECK(q.avail->flags == 0, "avail flags %u", q.avail->flags);
    virtq_disable_intr(&q);

    if (q.size < 4)
        goto done;
    /* a chain with nothing device-writable: whatever length the device
     * reports is ignored, not refused */
    while (tok_n(token) != 1 || tok_out(token) != 1)
        token++;
    struct vq_buf rb = {tok_addr(token, 0), tok_len(token, 0)};
    CHECK(virtq_add(&q, &rb, 1, 0, (void *)3) >= 0, "add");
    virtq_publish(&q);
    take_all(&v);
    CHECK(v.nheld == 1 && v.held[0].len == 0, "the device has the read-only chain");
    v.held[0].len = 72;
    complete(&v, 1);
    void *ck;
    u32 l = 99;
    CHECK(virtq_poll(&q, &ck, &l) == 1 && ck == (void *)3 && l == 0 && q.stat_len_ignored == 1,
          "read-only chain: len %u, %s", l, q.error);
    token++;
    /* impossible used entries are caught */
    printf("test-virtq: bad used entries follow; the driver must complain about each:\n");
    fflush(stdout);
    /* one writable buffer each */
    while (tok_n(token) != 1 || tok_out(token) != 0)
        token++;
    struct vq_buf b = {tok_addr(token, 0), tok_len(token, 0)};
    int ok_id = virtq_add(&q, &b, 0, 1, (void *)1);
    CHECK(ok_id >= 0, "add");
    virtq_publish(&q);
    take_all(&v);
    CHECK(v.nheld == 1, "one chain with the device");
    v.nheld = 0;
    v.held_ids[ok_id] = 0;
    int late_id = virtq_add(&q, &b, 0, 1, (void *)2); /* never published */
    CHECK(late_id >= 0, "add");
    u16 idle_id = 0;
    while (idle_id == ok_id || idle_id == late_id)
        idle_id++;
    struct pending bad[] = {
        {(u16)(q.size + 3), 1, 1}, /* beyond the ring */
        {idle_id, 1, 1},           /* not in flight */
        {(u16)late_id, 1, 1},      /* not made available */
        {(u16)ok_id, 1, b.len + 1}, /* longer than the buffer */
    };
    for (u32 i = 0; i < ARRAY_SIZE(bad); i++) {
        struct sdev saved = v;
        v.held[0] = bad[i];
        v.nheld = 1;
        complete(&v, 1);
        CHECK(virtq_poll(&q, 0, 0) == -1 && q.broken, "bad used entry %u (id %u len %u) not detected", i, bad[i].id,
              bad[i].len);
        q.broken = 0;
        v = saved; /* the device takes it back */
        if (!packed)
            q.used->idx = v.used_idx;
    }
    if (!packed) {
        q.used->idx = (u16)(v.used_idx + 5);
        CHECK(virtq_poll(&q, 0, 0) == -1 && q.broken, "used idx too far ahead not detected");
        q.broken = 0;
        q.used->idx = v.used_idx;
    } else {
        /* a used descriptor where the next chain was never published */
        v.held[0] = (struct pending){(u16)ok_id, 1, 1};
        v.nheld = 1;
        complete(&v, 1);
        CHECK(virtq_poll(&q, 0, 0) == 1, "a good used entry after the bad ones: %s", q.error);
        q.pdesc[q.last_used].flags = q.used_wrap ? (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED) : 0;
        q.pdesc[q.last_used].id = (u16)late_id;
        CHECK(virtq_poll(&q, 0, 0) == -1 && q.broken, "used descriptor with nothing published not detected");
    }
done:
    printf("test-virtq: size=%u %s event_idx=%d indirect_max=%u delta=0x%lx: %lu chains through the ring, "
           "%lu notifications (%lu expected), ok\n",
           q.size, packed ? "packed" : "split", event_idx, indirect_max, (unsigned long)delta, completed,
           notifies - kicks_before, kicks);
    CHECK(notifies - kicks_before == kicks, "QueueNotify writes");
    free(v.held);
    free(v.held_ids);
    free(seen);
}

int main(void)
{
    u64 size = 64 << 20;
    u8 *ram = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    struct boot_info *bi = (struct boot_info *)ram;
    bi->magic = VHOSTD_BOOT_MAGIC;
    bi->version = 1;
    bi->memory = (u64)(uintptr_t)ram + size;
    bi->free_start = (u64)(uintptr_t)ram + 4096;
    bi->free_end = bi->memory;
    rt_init(bi);

    CHECK(vring_need_event(5, 6, 5) == 1, "need_event basic");
    CHECK(vring_need_event(5, 5, 4) == 0, "need_event not yet");
    CHECK(vring_need_event(65535, 0, 65534) == 1, "need_event wrap");
    CHECK(vring_need_event(10, 20, 15) == 0, "need_event already passed");

    struct virtq q;
    struct virtq_mem m = {0};
    CHECK(virtq_init(&q, 0, 12, 0, 0, &m) == -1, "split size 12 accepted");
    CHECK(virtq_init(&q, 0, 0, VIRTQ_F_PACKED, 0, &m) == -1, "packed size 0 accepted");

    const unsigned P = VIRTQ_F_PACKED, E = VIRTQ_F_EVENT_IDX;
    const u64 D = 0x7f0000000000ull; /* device addresses far from the pointers */
    run(8, 0, 0, 200000, 1, 0);
    run(16, E, 0, 200000, 2, 0);
    run(256, E, 8, 300000, 3, 0);
    run(4, 0, 4, 100000, 4, 0);
    run(1024, 0, 0, 150000, 5, 0);
    run(64, E, 4, 100000, 6, D);
    run(8, P, 0, 200000, 11, 0);
    run(16, P | E, 0, 200000, 12, 0);
    run(256, P | E, 8, 300000, 13, 0);
    run(4, P, 4, 100000, 14, 0);
    run(1024, P, 0, 150000, 15, 0);
    run(1, P | E, 0, 100000, 16, 0);
    run(64, P | E, 4, 100000, 17, D);
    printf("test-virtq: PASS\n");
    return 0;
}
