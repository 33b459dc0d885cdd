/* virtio-mmio transport, driver side (virtio 1.2 section 4.2.3). */
#include "virtio_mmio.h"
#include "virtq.h"

static u32 rd(struct vdev *d, u32 off)
{
    return mmio_read32(d->base + off);
}

static void wr(struct vdev *d, u32 off, u32 v)
{
    mmio_write32(d->base + off, v);
}

u32 vdev_status(struct vdev *d)
{
    return rd(d, VIRTIO_MMIO_STATUS);
}

static void set_status(struct vdev *d, u32 bits)
{
    wr(d, VIRTIO_MMIO_STATUS, rd(d, VIRTIO_MMIO_STATUS) | bits);
}

void vdev_reset(struct vdev *d)
{
    wr(d, VIRTIO_MMIO_STATUS, 0);
    /* the reset is done when Status reads back 0 (bounded wait) */
    for (int i = 0; i < 1000000 && rd(d, VIRTIO_MMIO_STATUS) != 0; i++)
        cpu_relax();
}

void vdev_fail(struct vdev *d)
{
    set_status(d, VIRTIO_STATUS_FAILED);
}

int vdev_probe(struct vdev *d, u64 base, u32 expect_id, const char *name)
{
    memset(d, 0, sizeof(*d));
    d->base = base;
    d->name = name;
    u32 magic = rd(d, VIRTIO_MMIO_MAGIC_VALUE);
    if (magic != VIRTIO_MMIO_MAGIC) {
        printf("%s: bad magic 0x%x at 0x%lx\n", name, magic, base);
        return -1;
    }
    u32 version = rd(d, VIRTIO_MMIO_VERSION);
    if (version != 2) {
        printf("%s: virtio-mmio version %u, only version 2 is supported\n", name, version);
        return -1;
    }
    d->device_id = rd(d, VIRTIO_MMIO_DEVICE_ID);
    d->vendor_id = rd(d, VIRTIO_MMIO_VENDOR_ID);
    if (d->device_id == 0) {
        printf("%s: no device behind 0x%lx (device id 0)\n", name, base);
        return -1;
    }
    if (expect_id && d->device_id != expect_id) {
        printf("%s: device id %u, expected %u\n", name, d->device_id, expect_id);
        return -1;
    }
    vdev_reset(d);
    if (rd(d, VIRTIO_MMIO_STATUS) != 0) {
        printf("%s: status 0x%x after reset, expected 0\n", name, rd(d, VIRTIO_MMIO_STATUS));
        return -1;
    }
    set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
    set_status(d, VIRTIO_STATUS_DRIVER);
    wr(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    u64 lo = rd(d, VIRTIO_MMIO_DEVICE_FEATURES);
    wr(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    u64 hi = rd(d, VIRTIO_MMIO_DEVICE_FEATURES);
    d->dev_features = lo | hi << 32;
    return 0;
}

int vdev_negotiate(struct vdev *d, u64 wanted)
{
    if (!(d->dev_features & BIT(VIRTIO_F_VERSION_1))) {
        printf("%s: device does not offer VIRTIO_F_VERSION_1 (features 0x%lx)\n", d->name, d->dev_features);
        vdev_fail(d);
        return -1;
    }
    d->features = (d->dev_features & wanted) | BIT(VIRTIO_F_VERSION_1);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)d->features);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(d->features >> 32));
    set_status(d, VIRTIO_STATUS_FEATURES_OK);
    u32 st = rd(d, VIRTIO_MMIO_STATUS);
    if (!(st & VIRTIO_STATUS_FEATURES_OK)) {
        printf("%s: device refused features 0x%lx (status 0x%x)\n", d->name, d->features, st);
        vdev_fail(d);
        return -1;
    }
    return 0;
}

unsigned vdev_virtq_flags(const struct vdev *d)
{
    return (vdev_has(d, VIRTIO_F_RING_PACKED) ? VIRTQ_F_PACKED : 0u) |
           (vdev_has(d, VIRTIO_F_EVENT_IDX) ? VIRTQ_F_EVENT_IDX : 0u);
}

u32 vdev_queue_max(struct vdev *d, u32 index)
{
    wr(d, VIRTIO_MMIO_QUEUE_SEL, index);
    return rd(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
}

int vdev_queue_setup(struct vdev *d, struct virtq *q)
{
    wr(d, VIRTIO_MMIO_QUEUE_SEL, q->index);
    if (rd(d, VIRTIO_MMIO_QUEUE_READY) != 0) {
        printf("%s: queue %u already ready before setup\n", d->name, q->index);
        return -1;
    }
    u32 max = rd(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (max == 0 || q->size > max) {
        printf("%s: queue %u: size %u, device allows %u\n", d->name, q->index, q->size, max);
        return -1;
    }
    wr(d, VIRTIO_MMIO_QUEUE_NUM, q->size);
    u64 desc = q->desc_gpa, drv = q->driver_gpa, dev = q->device_gpa;
    wr(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)desc);
    wr(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)(desc >> 32));
    wr(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)drv);
    wr(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (u32)(drv >> 32));
    wr(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)dev);
    wr(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (u32)(dev >> 32));
    wr(d, VIRTIO_MMIO_QUEUE_READY, 1);
    if (rd(d, VIRTIO_MMIO_QUEUE_READY) != 1) {
        printf("%s: queue %u: QueueReady did not stick\n", d->name, q->index);
        return -1;
    }
    q->dev = d;
    return 0;
}

void vdev_driver_ok(struct vdev *d)
{
    set_status(d, VIRTIO_STATUS_DRIVER_OK);
}

/* Config space: read a field until ConfigGeneration is the same before and
 * after (a field wider than 32 bits is two accesses). */
u8 vdev_cfg8(struct vdev *d, u32 off)
{
    return mmio_read8(d->base + VIRTIO_MMIO_CONFIG + off);
}

u16 vdev_cfg16(struct vdev *d, u32 off)
{
    return mmio_read16(d->base + VIRTIO_MMIO_CONFIG + off);
}

u32 vdev_cfg32(struct vdev *d, u32 off)
{
    return mmio_read32(d->base + VIRTIO_MMIO_CONFIG + off);
}

u64 vdev_cfg64(struct vdev *d, u32 off)
{
    u32 gen, lo, hi;
    int tries = 0;
    do {
        gen = rd(d, VIRTIO_MMIO_CONFIG_GENERATION);
        lo = vdev_cfg32(d, off);
        hi = vdev_cfg32(d, off + 4);
    } while (rd(d, VIRTIO_MMIO_CONFIG_GENERATION) != gen && ++tries < 100);
    return (u64)lo | (u64)hi << 32;
}
