/* virtio-net driver (virtio 1.2 section 5.1), polled, one queue pair, no
 * offloads: every frame is a plain Ethernet frame of at most 1514 bytes. */
#ifndef GUEST_VIRTIO_NET_H
#define GUEST_VIRTIO_NET_H

#include "virtio_mmio.h"
#include "virtq.h"

#define VIRTIO_NET_F_MTU 3
#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_F_MRG_RXBUF 15
#define VIRTIO_NET_F_STATUS 16

#define VIRTIO_NET_S_LINK_UP 1

#define VNET_HDR_LEN 12 /* struct virtio_net_hdr with num_buffers (VERSION_1) */
#define ETH_MIN_FRAME 14
#define ETH_MAX_FRAME 1514
#define VNET_BUF_SIZE 2048 /* one rx or tx buffer: header + largest frame fit */

struct virtio_net_hdr {
    u8 flags;
    u8 gso_type;
    u16 hdr_len;
    u16 gso_size;
    u16 csum_start;
    u16 csum_offset;
    u16 num_buffers;
};
_Static_assert(sizeof(struct virtio_net_hdr) == VNET_HDR_LEN, "virtio_net_hdr layout");

struct vnet_opts {
    u32 queue_size;  /* 0: the largest the device allows, capped at 1024 */
    int mrg_rxbuf;   /* negotiate VIRTIO_NET_F_MRG_RXBUF if offered */
    int event_idx;
    int indirect;
    int packed;      /* negotiate VIRTIO_F_RING_PACKED if offered (0: split rings) */
    int split_hdr;   /* 0: header and frame in one tx descriptor; 1: two; 2: alternate */
};

struct vnet {
    struct vdev dev;
    struct virtq rx, tx;
    u8 mac[6];
    int mac_from_device; /* VIRTIO_NET_F_MAC negotiated */
    int mrg_rxbuf;
    int has_status;
    u16 link_status;
    u16 mtu;
    int split_hdr;
    u32 tx_count;        /* frames sent (for split_hdr=2) */

    u8 *rxbufs;          /* nrx buffers of VNET_BUF_SIZE */
    u16 nrx;
    u8 *txbufs;          /* ntx buffers of VNET_BUF_SIZE */
    u16 ntx;
    u16 *tx_free;        /* stack of free tx buffer indices */
    u16 tx_free_n;

    u64 rx_frames, tx_frames, rx_errors;
};

void vnet_default_opts(struct vnet_opts *o);
/* Probe, negotiate, set up rx (0) and tx (1), post every rx buffer,
 * DRIVER_OK.  Without VIRTIO_NET_F_MAC, mac is a locally administered
 * address made from `mac_seed`.  Returns 0 or -1. */
int vnet_init(struct vnet *n, u64 mmio_base, const char *name, const struct vnet_opts *o, u64 mac_seed);
/* Queue one frame (copied).  Not kicked.  Returns 0, -1 when no tx buffer
 * or descriptor is free (reap and retry), -2 if the frame size is invalid
 * or the queue broke. */
int vnet_send(struct vnet *n, const void *frame, u32 len);
int vnet_tx_kick(struct vnet *n);
/* Frees the tx buffers of completed frames; returns how many (-1: broken). */
int vnet_reap_tx(struct vnet *n);
static inline u16 vnet_tx_inflight(const struct vnet *n) { return (u16)(n->ntx - n->tx_free_n); }
/* Receive one frame into dst (at most cap bytes; longer frames are cut,
 * their length returned).  Returns the frame length, 0 if none is waiting,
 * -1 on a broken queue or a malformed completion.  The buffers go straight
 * back to the device (kicked by vnet_rx_kick). */
int vnet_recv(struct vnet *n, void *dst, u32 cap);
int vnet_rx_kick(struct vnet *n);
/* Current link status from config space (1 = up; 1 without F_STATUS). */
int vnet_link_up(struct vnet *n);

#endif
