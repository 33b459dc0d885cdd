/* virtio-blk driver (virtio 1.2 section 5.2). */
#include "virtio_blk.h"

/* config space offsets (5.2.4) */
#define CFG_CAPACITY 0
#define CFG_SIZE_MAX 8
#define CFG_SEG_MAX 12
#define CFG_BLK_SIZE 20
#define CFG_NUM_QUEUES 34

void vblk_default_opts(struct vblk_opts *o)
{
    o->queues = 1;
    o->queue_size = 0;
    o->event_idx = 1;
    o->indirect = 1;
    o->packed = 1;
}

int vblk_init(struct vblk *b, u64 mmio_base, const char *name, const struct vblk_opts *o)
{
    memset(b, 0, sizeof(*b));
    if (vdev_probe(&b->dev, mmio_base, VIRTIO_ID_BLK, name) < 0)
        return -1;
    u64 want = BIT(VIRTIO_BLK_F_SIZE_MAX) | BIT(VIRTIO_BLK_F_SEG_MAX) | BIT(VIRTIO_BLK_F_RO) |
               BIT(VIRTIO_BLK_F_BLK_SIZE) | BIT(VIRTIO_BLK_F_FLUSH) | BIT(VIRTIO_BLK_F_TOPOLOGY) |
               BIT(VIRTIO_BLK_F_DISCARD) | BIT(VIRTIO_BLK_F_WRITE_ZEROES);
    if (o->queues > 1)
        want |= BIT(VIRTIO_BLK_F_MQ);
    if (o->event_idx)
        want |= BIT(VIRTIO_F_EVENT_IDX);
    if (o->indirect)
        want |= BIT(VIRTIO_F_INDIRECT_DESC);
    if (o->packed)
        want |= BIT(VIRTIO_F_RING_PACKED);
    if (vdev_negotiate(&b->dev, want) < 0)
        return -1;
    struct vdev *d = &b->dev;

    b->capacity = vdev_cfg64(d, CFG_CAPACITY);
    b->size_max = vdev_has(d, VIRTIO_BLK_F_SIZE_MAX) ? vdev_cfg32(d, CFG_SIZE_MAX) : 0;
    b->seg_max = vdev_has(d, VIRTIO_BLK_F_SEG_MAX) ? vdev_cfg32(d, CFG_SEG_MAX) : 0;
    b->blk_size = vdev_has(d, VIRTIO_BLK_F_BLK_SIZE) ? vdev_cfg32(d, CFG_BLK_SIZE) : SECTOR_SIZE;
    b->num_queues = vdev_has(d, VIRTIO_BLK_F_MQ) ? vdev_cfg16(d, CFG_NUM_QUEUES) : 1;
    if (b->num_queues == 0)
        b->num_queues = 1;
    b->ro = vdev_has(d, VIRTIO_BLK_F_RO);
    b->can_flush = vdev_has(d, VIRTIO_BLK_F_FLUSH);
    b->can_write_zeroes = vdev_has(d, VIRTIO_BLK_F_WRITE_ZEROES);
    b->can_discard = vdev_has(d, VIRTIO_BLK_F_DISCARD);
    b->timeout_cycles = us_to_cycles(cmd_u64("io_timeout_ms", 10000) * 1000);

    u32 nq = o->queues ? o->queues : 1;
    if (nq > b->num_queues)
        nq = b->num_queues;
    if (nq > VBLK_MAX_QUEUES)
        nq = VBLK_MAX_QUEUES;
    u16 ind = vdev_has(d, VIRTIO_F_INDIRECT_DESC) ? VBLK_MAX_DATA_SEGS + 2 : 0;
    for (u32 i = 0; i < nq; i++) {
        u32 max = vdev_queue_max(d, i);
        if (max == 0) {
            if (i == 0) {
                printf("%s: queue 0 not available\n", name);
                vdev_fail(d);
                return -1;
            }
            break;
        }
        u32 size = o->queue_size ? o->queue_size : 1024;
        if (size > max)
            size = max;
        virtq_alloc(&b->q[i], (u16)i, (u16)size, vdev_virtq_flags(d), ind);
        if (vdev_queue_setup(d, &b->q[i]) < 0) {
            vdev_fail(d);
            return -1;
        }
        b->nq = i + 1;
    }
    vdev_driver_ok(d);
    return 0;
}

struct vblk_req *vblk_req_alloc(void)
{
    return zalloc(sizeof(struct vblk_req), 64);
}

/* number of data segments len bytes take with the device's size_max */
static u32 data_segs(const struct vblk *b, u32 len)
{
    if (!len)
        return 0;
    if (!b->size_max)
        return 1;
    return (len + b->size_max - 1) / b->size_max;
}

int vblk_room(struct vblk *b, u32 qi, u32 len)
{
    return virtq_has_room(&b->q[qi], (int)data_segs(b, len) + 2);
}

int vblk_submit(struct vblk *b, u32 qi, struct vblk_req *r, u32 type, u64 sector, void *buf, u32 len)
{
    struct virtq *q = &b->q[qi];
    u32 segs = data_segs(b, len);
    if (segs > VBLK_MAX_DATA_SEGS || (b->seg_max && segs > b->seg_max) || q->broken)
        return -2;
    struct vq_buf v[VBLK_MAX_DATA_SEGS + 2];
    int writable_data = type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID;
    int n = 0;
    r->hdr.type = type;
    r->hdr.reserved = 0;
    r->hdr.sector = sector;
    r->status = VBLK_S_PENDING;
    r->buf = buf;
    r->len = len;
    r->queue = (u16)qi;
    v[n].addr = gpa(&r->hdr);
    v[n++].len = sizeof(r->hdr);
    u64 a = gpa(buf);
    for (u32 left = len; left;) {
        u32 chunk = b->size_max && left > b->size_max ? b->size_max : left;
        v[n].addr = a;
        v[n++].len = chunk;
        a += chunk;
        left -= chunk;
    }
    v[n].addr = gpa(&r->status);
    v[n++].len = 1;
    int n_out = writable_data ? 1 : n - 1;
    if (virtq_add(q, v, n_out, n - n_out, r) < 0)
        return -1;
    r->in_flight = 1;
    r->t_submit = rdtsc();
    return 0;
}

int vblk_kick(struct vblk *b, u32 qi)
{
    return virtq_kick(&b->q[qi]);
}

struct vblk_req *vblk_poll(struct vblk *b, u32 qi, int *err)
{
    void *c;
    u32 len;
    int r = virtq_poll(&b->q[qi], &c, &len);
    if (r < 0 && err)
        *err = 1;
    if (r <= 0)
        return 0;
    struct vblk_req *req = c;
    req->used_len = len;
    req->in_flight = 0;
    return req;
}

int vblk_do(struct vblk *b, u32 type, u64 sector, void *buf, u32 len)
{
    struct vblk_req *r = vblk_req_alloc();
    int rc = vblk_submit(b, 0, r, type, sector, buf, len);
    if (rc < 0) {
        printf("%s: cannot submit a request (%s)\n", b->dev.name, rc == -1 ? "queue full" : "queue broken");
        return -1;
    }
    vblk_kick(b, 0);
    u64 t0 = rdtsc();
    for (;;) {
        int err = 0;
        struct vblk_req *done = vblk_poll(b, 0, &err);
        if (err)
            return -1;
        if (done == r)
            return r->status;
        if (done) /* someone else's request: the synchronous helpers are used alone */
            printf("%s: unexpected completion of request %p\n", b->dev.name, (void *)done);
        if (rdtsc() - t0 > b->timeout_cycles) {
            printf("%s: request type %u sector %lu: no completion after %lu ms\n", b->dev.name, type, sector,
                   cycles_to_us(b->timeout_cycles) / 1000);
            return -1;
        }
        cpu_relax();
    }
}

int vblk_get_id(struct vblk *b, char out[VIRTIO_BLK_ID_BYTES + 1])
{
    u8 *buf = zalloc(VIRTIO_BLK_ID_BYTES, 64);
    int st = vblk_do(b, VIRTIO_BLK_T_GET_ID, 0, buf, VIRTIO_BLK_ID_BYTES);
    memcpy(out, buf, VIRTIO_BLK_ID_BYTES);
    out[VIRTIO_BLK_ID_BYTES] = '\0';
    return st;
}
