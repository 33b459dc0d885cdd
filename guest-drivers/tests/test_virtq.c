/* Unit test of the split virtqueue (lib/virtq.c), hosted: a scripted device
 * in the same thread consumes the avail ring and completes chains in random
 * order; checks index wrap-around (> 65536 operations), the free list, chain
 * contents, indirect tables, notification suppression and the detection of
 * impossible used entries. */
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

struct pending {
    u16 head;
    u32 len;
};

/* Walk a chain as a device would and check it against its token. */
static int dev_walk(struct virtq *q, u16 head)
{
    struct vring_desc *t = q->desc;
    u32 n = q->size, i = head;
    int k = 0;
    if (t[head].flags & VRING_DESC_F_INDIRECT) {
        CHECK(!(t[head].flags & VRING_DESC_F_NEXT), "INDIRECT with NEXT");
        t = (struct vring_desc *)(uintptr_t)q->desc[head].addr;
        n = q->desc[head].len / 16;
        CHECK(n >= 2 && n <= q->indirect_max && q->desc[head].len % 16 == 0, "indirect len %u", q->desc[head].len);
        i = 0;
    }
    u64 token = t[i].addr >> 16;
    int cnt = tok_n(token), n_out = tok_out(token);
    for (;;) {
        CHECK(k < cnt && i < n, "chain too long or next out of range (k=%d i=%u n=%u)", k, i, n);
        CHECK(t[i].addr == tok_addr(token, k), "buffer %d of token %lu: addr 0x%lx", k, (unsigned long)token,
              (unsigned long)t[i].addr);
        CHECK(t[i].len == tok_len(token, k), "buffer %d: len %u", k, t[i].len);
        CHECK(!!(t[i].flags & VRING_DESC_F_WRITE) == (k >= n_out), "buffer %d: write flag", k);
        k++;
        if (!(t[i].flags & VRING_DESC_F_NEXT))
            break;
        i = t[i].next;
    }
    CHECK(k == cnt, "chain of token %lu has %d buffers, expected %d", (unsigned long)token, k, cnt);
    return k;
}

static void run(u16 size, int event_idx, u16 indirect_max, unsigned long ops, unsigned seed)
{
    struct virtq q;
    virtq_alloc(&q, 0, size, event_idx, indirect_max);
    struct vdev dev = {.base = 0xd0000000, .name = "test"};
    q.dev = &dev;
    CHECK(q.size && (q.size & (q.size - 1)) == 0, "size %u", q.size);
    srand(seed);
    u16 dev_last_avail = 0, used_idx = 0;
    struct pending *held = calloc(q.size, sizeof(*held));
    int nheld = 0;
    unsigned long added = 0, completed = 0;
    u64 token = 1;
    unsigned long kicks_before = notifies;
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
            int head = virtq_add(&q, b, n_out, n - n_out, (void *)(uintptr_t)token);
            CHECK(head >= 0 && head < q.size, "add returned %d", head);
            CHECK(free_before - q.num_free == virtq_descs_needed(&q, n), "descriptors taken");
            token++;
            added++;
        }
        if (rand() % 3 == 0)
            virtq_kick(&q);
        else
            virtq_publish(&q);
        /* device: take what is published, complete some in random order */
        u16 avail = q.avail->idx;
        CHECK((u16)(avail - dev_last_avail) <= q.size, "avail ran %u ahead", (u16)(avail - dev_last_avail));
        while (dev_last_avail != avail) {
            u16 head = q.avail->ring[dev_last_avail % q.size];
            dev_last_avail++;
            for (int h = 0; h < nheld; h++)
                CHECK(held[h].head != head, "head %u handed out twice", head);
            held[nheld].head = head;
            held[nheld].len = (u32)dev_walk(&q, head) * 7;
            nheld++;
        }
        if (event_idx)
            *(u16 *)&q.used->ring[q.size] = (u16)(dev_last_avail + rand() % 3); /* avail_event */
        else
            q.used->flags = rand() % 2 ? VRING_USED_F_NO_NOTIFY : 0;
        int completes = nheld ? rand() % (nheld + 1) : 0;
        for (int c = 0; c < completes; c++) {
            int pick = rand() % nheld;
            struct pending p = held[pick];
            held[pick] = held[--nheld];
            q.used->ring[used_idx % q.size].id = p.head;
            q.used->ring[used_idx % q.size].len = p.len;
            used_idx++;
        }
        __atomic_store_n(&q.used->idx, used_idx, __ATOMIC_RELEASE);
        /* driver: reap; the used length must be the one for its token */
        void *cookie;
        u32 len;
        int r;
        while ((r = virtq_poll(&q, &cookie, &len)) == 1) {
            u64 t = (u64)(uintptr_t)cookie;
            CHECK(t && t < token, "bad cookie %lu", (unsigned long)t);
            CHECK(len == (u32)tok_n(t) * 7, "token %lu: used len %u", (unsigned long)t, len);
            completed++;
        }
        CHECK(r == 0, "poll returned %d", r);
        CHECK(q.num_free <= q.size, "num_free %u > size", q.num_free);
        if (event_idx)
            CHECK((u16)(q.avail->ring[q.size] - q.last_used) == 0x8000, "used_event not kept ahead");
        else
            CHECK(q.avail->flags == VRING_AVAIL_F_NO_INTERRUPT, "NO_INTERRUPT not set");
    }
    /* drain everything and check the free list is whole again */
    virtq_publish(&q);
    u16 avail = q.avail->idx;
    while (dev_last_avail != avail) {
        u16 head = q.avail->ring[dev_last_avail % q.size];
        held[nheld].head = head;
        held[nheld].len = (u32)dev_walk(&q, head) * 7;
        nheld++;
        dev_last_avail++;
    }
    while (nheld) {
        struct pending p = held[--nheld];
        q.used->ring[used_idx % q.size].id = p.head;
        q.used->ring[used_idx % q.size].len = p.len;
        used_idx++;
    }
    q.used->idx = used_idx;
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
    CHECK(q.last_used == used_idx, "last_used %u used_idx %u", q.last_used, used_idx);
    CHECK(added > 70000 || ops < 70000, "too few operations to wrap the 16-bit indices");

    /* impossible used entries are caught: a head not in flight, an index too far ahead */
    printf("test-virtq: two bad used entries follow; the driver must complain about both:\n");
    fflush(stdout);
    struct vq_buf b = {0x1000, 1};
    CHECK(virtq_add(&q, &b, 1, 0, (void *)1) >= 0, "add");
    virtq_publish(&q);
    q.used->ring[used_idx % q.size].id = q.size + 3;
    q.used->idx = ++used_idx;
    CHECK(virtq_poll(&q, 0, 0) == -1 && q.broken, "bad id not detected");
    q.broken = 0;
    q.used->idx = (u16)(used_idx + 5);
    CHECK(virtq_poll(&q, 0, 0) == -1 && q.broken, "used idx too far ahead not detected");
    printf("test-virtq: size=%u event_idx=%d indirect_max=%u: %lu chains through the ring, %lu notifications, ok\n",
           q.size, event_idx, indirect_max, completed, notifies - kicks_before);
    free(held);
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

    run(8, 0, 0, 200000, 1);
    run(16, 1, 0, 200000, 2);
    run(256, 1, 8, 300000, 3);
    run(4, 0, 4, 100000, 4);
    run(1024, 0, 0, 150000, 5);
    printf("test-virtq: PASS\n");
    return 0;
}
