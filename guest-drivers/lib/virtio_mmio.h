/* virtio-mmio transport, driver side (virtio 1.2 section 4.2, version 2). */
#ifndef GUEST_VIRTIO_MMIO_H
#define GUEST_VIRTIO_MMIO_H

#include "rt.h"

#define VIRTIO_MMIO_MAGIC_VALUE 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC 0x74726976u /* "virt" */

/* device status (2.1) */
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED 0x80

/* reserved feature bits (6) */
#define VIRTIO_F_INDIRECT_DESC 28
#define VIRTIO_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32
#define VIRTIO_F_RING_PACKED 34

#define BIT(n) (1ull << (n))

struct virtq;

struct vdev {
    u64 base;          /* MMIO base (GPA) */
    u32 device_id;
    u32 vendor_id;
    u64 dev_features;  /* offered by the device */
    u64 features;      /* negotiated */
    const char *name;  /* for messages, e.g. "blk0" */
};

/* Probe (magic, version 2, device id; expect_id 0 accepts any), reset, then
 * ACKNOWLEDGE | DRIVER and read the device features.  Returns 0 or -1 with a
 * message printed. */
int vdev_probe(struct vdev *d, u64 base, u32 expect_id, const char *name);
/* Driver features = offered & wanted (VIRTIO_F_RING_PACKED among them makes
 * the queues packed: virtq_flags), plus VERSION_1 (which the device must
 * offer); FEATURES_OK written and read back.  Returns 0 or -1. */
int vdev_negotiate(struct vdev *d, u64 wanted);
static inline int vdev_has(const struct vdev *d, int bit) { return (d->features >> bit) & 1; }
/* virtq_alloc flags for what was negotiated (VIRTQ_F_PACKED, VIRTQ_F_EVENT_IDX) */
unsigned vdev_virtq_flags(const struct vdev *d);
/* Queue size the device allows for queue `index` (0: queue not available). */
u32 vdev_queue_max(struct vdev *d, u32 index);
/* Program queue q->index with q's rings (already allocated by virtq_alloc):
 * QueueDesc = descriptor table or ring, QueueDriver = avail ring or driver
 * event area, QueueDevice = used ring or device event area; then set
 * QueueReady.  Returns 0 or -1. */
int vdev_queue_setup(struct vdev *d, struct virtq *q);
void vdev_driver_ok(struct vdev *d);
void vdev_fail(struct vdev *d); /* sets FAILED */
void vdev_reset(struct vdev *d);
u32 vdev_status(struct vdev *d);
static inline void vdev_notify(const struct vdev *d, u32 queue)
{
    mmio_write32(d->base + VIRTIO_MMIO_QUEUE_NOTIFY, queue);
}

/* Config space reads (device-specific layout at 0x100), natural widths;
 * 64-bit fields are read as two halves under a ConfigGeneration check. */
u8 vdev_cfg8(struct vdev *d, u32 off);
u16 vdev_cfg16(struct vdev *d, u32 off);
u32 vdev_cfg32(struct vdev *d, u32 off);
u64 vdev_cfg64(struct vdev *d, u32 off);

#endif
