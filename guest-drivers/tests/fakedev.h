/* Fake virtio-mmio machine for the hosted tests (not part of the guest
 * programs).  Devices are served by one thread that wakes on QueueNotify,
 * like a vhost-user back-end on its kick eventfd, and checks every
 * descriptor strictly: anything malformed breaks the queue (NEEDS_RESET) and
 * is counted as a violation. */
#ifndef FAKEDEV_H
#define FAKEDEV_H

#include <stdint.h>

struct fake_opts {
    int event_idx;   /* offer VIRTIO_F_EVENT_IDX */
    int indirect;    /* offer VIRTIO_F_INDIRECT_DESC */
    int packed;      /* offer VIRTIO_F_RING_PACKED */
    int mrg_rxbuf;   /* offer VIRTIO_NET_F_MRG_RXBUF */
    int net_mac;     /* offer VIRTIO_NET_F_MAC */
    uint32_t queue_max;
    uint32_t blk_queues;
    uint32_t size_max; /* 0: do not offer SIZE_MAX */
    int reorder;     /* complete blk requests of a batch in reverse order */
};

void fake_init(uint64_t ram_lo, uint64_t ram_hi, const struct fake_opts *o);
/* returns the mmio base of the new device */
uint64_t fake_add_blk(uint64_t sectors, int readonly, const char *serial);
/* mode: "loopback", "switch" (frames go to fake_switch_* shared memory), "sink" */
uint64_t fake_add_net(const char *mode, const uint8_t mac[6]);
/* a two-port switch in shared memory, for two forked processes */
void fake_switch_create(void);
void fake_switch_port(int port);
void fake_start(void);
/* Violations seen (malformed rings); the summary is printed at exit. */
unsigned long fake_violations(void);
void fake_summary(void);

#endif
