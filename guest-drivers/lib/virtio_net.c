/* virtio-net driver (virtio 1.2 section 5.1). */
#include "virtio_net.h"

#define RXQ 0
#define TXQ 1
/* config space offsets (5.1.4) */
#define CFG_MAC 0
#define CFG_STATUS 6
#define CFG_MTU 10

void vnet_default_opts(struct vnet_opts *o)
{
    o->queue_size = 0;
    o->mrg_rxbuf = 1;
    o->event_idx = 1;
    o->indirect = 1;
    o->packed = 1;
    o->split_hdr = 0;
}

static void post_rx(struct vnet *n, u16 i)
{
    struct vq_buf b = {gpa(n->rxbufs + (u64)i * VNET_BUF_SIZE), VNET_BUF_SIZE};
    if (virtq_add(&n->rx, &b, 0, 1, (void *)(uintptr_t)(i + 1)) < 0)
        panic("%s: rx ring full while reposting buffer %u", n->dev.name, i);
}

static u16 pick_size(struct vdev *d, u32 idx, u32 wanted)
{
    u32 max = vdev_queue_max(d, idx);
    u32 size = wanted ? wanted : 1024;
    if (size > max)
        size = max;
    return (u16)size;
}

int vnet_init(struct vnet *n, u64 mmio_base, const char *name, const struct vnet_opts *o, u64 mac_seed)
{
    memset(n, 0, sizeof(*n));
    if (vdev_probe(&n->dev, mmio_base, VIRTIO_ID_NET, name) < 0)
        return -1;
    u64 want = BIT(VIRTIO_NET_F_MAC) | BIT(VIRTIO_NET_F_STATUS) | BIT(VIRTIO_NET_F_MTU);
    if (o->mrg_rxbuf)
        want |= BIT(VIRTIO_NET_F_MRG_RXBUF);
    if (o->event_idx)
        want |= BIT(VIRTIO_F_EVENT_IDX);
    if (o->indirect)
        want |= BIT(VIRTIO_F_INDIRECT_DESC);
    if (o->packed)
        want |= BIT(VIRTIO_F_RING_PACKED);
    if (vdev_negotiate(&n->dev, want) < 0)
        return -1;
    struct vdev *d = &n->dev;
    n->mrg_rxbuf = vdev_has(d, VIRTIO_NET_F_MRG_RXBUF);
    n->mac_from_device = vdev_has(d, VIRTIO_NET_F_MAC);
    n->has_status = vdev_has(d, VIRTIO_NET_F_STATUS);
    n->split_hdr = o->split_hdr;
    if (n->mac_from_device) {
        for (int i = 0; i < 6; i++)
            n->mac[i] = vdev_cfg8(d, CFG_MAC + (u32)i);
    } else {
        u64 m = mix64(mac_seed);
        for (int i = 0; i < 6; i++)
            n->mac[i] = (u8)(m >> (8 * i));
        n->mac[0] = (u8)((n->mac[0] & 0xfe) | 0x02); /* unicast, locally administered */
    }
    n->link_status = n->has_status ? vdev_cfg16(d, CFG_STATUS) : VIRTIO_NET_S_LINK_UP;
    n->mtu = vdev_has(d, VIRTIO_NET_F_MTU) ? vdev_cfg16(d, CFG_MTU) : 1500;

    u16 ind = vdev_has(d, VIRTIO_F_INDIRECT_DESC) ? 2 : 0;
    unsigned qf = vdev_virtq_flags(d);
    u16 rxs = pick_size(d, RXQ, o->queue_size), txs = pick_size(d, TXQ, o->queue_size);
    if (!rxs || !txs) {
        printf("%s: rx/tx queue not available (max %u/%u)\n", name, rxs, txs);
        vdev_fail(d);
        return -1;
    }
    virtq_alloc(&n->rx, RXQ, rxs, qf, 0);
    virtq_alloc(&n->tx, TXQ, txs, qf, ind);
    if (vdev_queue_setup(d, &n->rx) < 0 || vdev_queue_setup(d, &n->tx) < 0) {
        vdev_fail(d);
        return -1;
    }
    n->nrx = n->rx.size;
    n->rxbufs = alloc((u64)n->nrx * VNET_BUF_SIZE, 4096);
    n->ntx = n->tx.size;
    n->txbufs = alloc((u64)n->ntx * VNET_BUF_SIZE, 4096);
    n->tx_free = alloc(2ull * n->ntx, 8);
    for (u16 i = 0; i < n->ntx; i++)
        n->tx_free[i] = (u16)(n->ntx - 1 - i);
    n->tx_free_n = n->ntx;
    for (u16 i = 0; i < n->nrx; i++)
        post_rx(n, i);
    vdev_driver_ok(d);
    virtq_kick(&n->rx);
    return 0;
}

int vnet_link_up(struct vnet *n)
{
    if (!n->has_status)
        return 1;
    n->link_status = vdev_cfg16(&n->dev, CFG_STATUS);
    return n->link_status & VIRTIO_NET_S_LINK_UP;
}

int vnet_send(struct vnet *n, const void *frame, u32 len)
{
    if (len < ETH_MIN_FRAME || len > ETH_MAX_FRAME || n->tx.broken)
        return -2;
    int split = n->split_hdr == 1 || (n->split_hdr == 2 && (n->tx_count & 1));
    if (!n->tx_free_n || !virtq_has_room(&n->tx, split ? 2 : 1))
        return -1;
    u16 i = n->tx_free[--n->tx_free_n];
    u8 *b = n->txbufs + (u64)i * VNET_BUF_SIZE;
    memset(b, 0, VNET_HDR_LEN); /* no offloads; num_buffers is 0 on tx */
    memcpy(b + VNET_HDR_LEN, frame, len);
    struct vq_buf v[2];
    int nb;
    if (split) {
        v[0].addr = gpa(b);
        v[0].len = VNET_HDR_LEN;
        v[1].addr = gpa(b + VNET_HDR_LEN);
        v[1].len = len;
        nb = 2;
    } else {
        v[0].addr = gpa(b);
        v[0].len = VNET_HDR_LEN + len;
        nb = 1;
    }
    if (virtq_add(&n->tx, v, nb, 0, (void *)(uintptr_t)(i + 1)) < 0) {
        n->tx_free_n++;
        return -1;
    }
    n->tx_count++;
    n->tx_frames++;
    return 0;
}

int vnet_tx_kick(struct vnet *n)
{
    return virtq_kick(&n->tx);
}

int vnet_reap_tx(struct vnet *n)
{
    int freed = 0;
    for (;;) {
        void *c;
        int r = virtq_poll(&n->tx, &c, 0);
        if (r < 0)
            return -1;
        if (r == 0)
            return freed;
        uintptr_t i = (uintptr_t)c;
        if (i == 0 || i > n->ntx)
            panic("%s: tx completion with bad cookie %lu", n->dev.name, (u64)i);
        n->tx_free[n->tx_free_n++] = (u16)(i - 1);
        freed++;
    }
}

int vnet_rx_kick(struct vnet *n)
{
    return virtq_kick(&n->rx);
}

/* the next rx completion: buffer index, or -1 (none, -2 broken) */
static int rx_next(struct vnet *n, u32 *len)
{
    void *c;
    int r = virtq_poll(&n->rx, &c, len);
    if (r < 0)
        return -2;
    if (r == 0)
        return -1;
    uintptr_t i = (uintptr_t)c;
    if (i == 0 || i > n->nrx)
        panic("%s: rx completion with bad cookie %lu", n->dev.name, (u64)i);
    return (int)(i - 1);
}

int vnet_recv(struct vnet *n, void *dst, u32 cap)
{
    u32 len;
    int i = rx_next(n, &len);
    if (i == -1)
        return 0;
    if (i < 0)
        return -1;
    u8 *b = n->rxbufs + (u64)i * VNET_BUF_SIZE;
    int bad = 0;
    u32 bufs = 1;
    if (len < VNET_HDR_LEN || len > VNET_BUF_SIZE) {
        printf("%s: rx buffer %d used with length %u\n", n->dev.name, i, len);
        bad = 1;
        len = len > VNET_BUF_SIZE ? VNET_BUF_SIZE : VNET_HDR_LEN;
    }
    if (n->mrg_rxbuf) {
        struct virtio_net_hdr h;
        memcpy(&h, b, sizeof(h));
        bufs = h.num_buffers;
        if (bufs == 0 || bufs > n->nrx) {
            printf("%s: rx header says num_buffers=%u\n", n->dev.name, bufs);
            bad = 1;
            bufs = 1;
        }
    }
    u32 flen = len - VNET_HDR_LEN, out = flen < cap ? flen : cap;
    memcpy(dst, b + VNET_HDR_LEN, out);
    post_rx(n, (u16)i);
    /* merged buffers: the device published them together */
    for (u32 k = 1; k < bufs; k++) {
        u32 l2;
        int j;
        u64 t0 = rdtsc();
        while ((j = rx_next(n, &l2)) == -1) {
            if (rdtsc() - t0 > us_to_cycles(1000000)) {
                printf("%s: merged rx frame: buffer %u of %u never came\n", n->dev.name, k + 1, bufs);
                n->rx_errors++;
                return -1;
            }
            cpu_relax();
        }
        if (j < 0)
            return -1;
        u8 *b2 = n->rxbufs + (u64)j * VNET_BUF_SIZE;
        if (l2 > VNET_BUF_SIZE)
            l2 = VNET_BUF_SIZE;
        if (out < cap) {
            u32 c = l2 < cap - out ? l2 : cap - out;
            memcpy((u8 *)dst + out, b2, c);
            out += c;
        }
        flen += l2;
        post_rx(n, (u16)j);
    }
    if (bad) {
        n->rx_errors++;
        return -1;
    }
    n->rx_frames++;
    return flen ? (int)flen : -1;
}
