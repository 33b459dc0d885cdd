/* netbench: frames through a vhostd loopback port and back, with a window.
 *
 *   size=64 (60..1514)  window=64  seconds=N | count=N  dev=0
 *   verify=0|1|2  batch=16  event_idx=0|1  indirect=0|1  mrg_rxbuf=0|1  packed=0|1
 *
 * Final line: "PPS=<n> Mbps=<n> tx=<n> rx=<n> lost=0 cycles=<n> tsc_khz=<n>
 * ..." or "NETBENCH FAIL: reason".  See ../README.md.
 */
#include "netproto.h"
#include "rt.h"
#include "virtio_net.h"

#define bench_fail(...) fail_line("NETBENCH FAIL: ", __VA_ARGS__)

int main(struct boot_info *bi)
{
    u32 size = (u32)cmd_u64("size", 64);
    u32 window = (u32)cmd_u64("window", 64);
    u64 count = cmd_u64("count", 0);
    u64 seconds = cmd_u64("seconds", count ? 0 : 5);
    u32 devno = (u32)cmd_u64("dev", 0);
    u32 verify = (u32)cmd_u64("verify", 1);
    u32 batch = (u32)cmd_u64("batch", 16);
    if (size < NP_MIN_FRAME || size > NP_MAX_FRAME)
        return bench_fail("size=%u: %u..%u", size, NP_MIN_FRAME, NP_MAX_FRAME);
    if (batch == 0)
        batch = 1;

    u64 base = 0;
    for (u32 i = 0, k = 0; i < bi->num_devices; i++)
        if (bi->devices[i].device_id == VIRTIO_ID_NET && k++ == devno) {
            base = bi->devices[i].mmio_base;
            break;
        }
    if (!base)
        return bench_fail("no net device number %u among %u devices", devno, bi->num_devices);

    struct vnet *n = zalloc(sizeof(*n), 64);
    struct vnet_opts o;
    vnet_default_opts(&o);
    o.event_idx = !cmd_is("event_idx", "0", 0);
    o.indirect = !cmd_is("indirect", "0", 0);
    o.mrg_rxbuf = !cmd_is("mrg_rxbuf", "0", 0);
    o.packed = !cmd_is("packed", "0", 0);
    o.queue_size = (u32)cmd_u64("queue_size", 0);
    if (vnet_init(n, base, "net", &o, rdtsc()) < 0)
        return bench_fail("device initialisation failed");
    /* the window must fit the rx ring (every frame in flight comes back into it) */
    if (window > n->nrx)
        window = n->nrx;
    if (window > n->ntx)
        window = n->ntx;
    if (window == 0)
        window = 1;
    printf("netbench: size=%u window=%u batch=%u verify=%u queue_size=%u/%u ring=%s features=0x%lx\n", size, window,
           batch, verify, n->rx.size, n->tx.size, n->rx.packed ? "packed" : "split", n->dev.features);
    printf("netbench: %s%lu tsc_khz=%lu (%s)\n", count ? "count=" : "seconds=", count ? count : seconds, g_tsc_khz,
           g_tsc_source);

    u32 nonce = (u32)mix64(rdtsc());
    u8 *tmpl = alloc(NP_MAX_FRAME, 64), *rx = alloc(VNET_BUF_SIZE, 64), *exp = alloc(NP_MAX_FRAME, 64);
    np_build(tmpl, size, n->mac, n->mac, NP_DATA, 0, nonce, 0, 0);
    const u32 seq_off = NP_HDR_OFF + offsetof(struct np_hdr, seq);

    u64 sent = 0, got = 0, bad = 0, foreign = 0;
    u64 t0 = rdtsc(), deadline = seconds ? t0 + us_to_cycles(seconds * 1000000) : ~0ull;
    u64 last_progress = t0, drain_limit = us_to_cycles(2000000);
    int stopping = 0;
    for (;;) {
        u64 now = rdtsc();
        if (!stopping && (now >= deadline || (count && sent >= count)))
            stopping = 1;
        if (stopping && got == sent)
            break;
        if (now - last_progress > drain_limit) {
            if (!stopping)
                return bench_fail("no frame came back for %lu ms (%lu sent, %lu received): is the port a loopback?",
                                  cycles_to_us(drain_limit) / 1000, sent, got);
            break; /* the rest is lost */
        }
        if (vnet_reap_tx(n) < 0)
            return bench_fail("tx queue returned a bad used entry");
        u32 queued = 0;
        while (!stopping && sent - got < window && (!count || sent < count) && queued < batch) {
            u32 s = (u32)sent;
            if (verify >= 2) {
                np_build(exp, size, n->mac, n->mac, NP_DATA, s, nonce, 0, 1);
                if (vnet_send(n, exp, size) != 0)
                    break;
            } else {
                memcpy(tmpl + seq_off, &s, 4);
                if (vnet_send(n, tmpl, size) != 0)
                    break;
            }
            sent++;
            queued++;
        }
        if (queued)
            vnet_tx_kick(n);
        int len, reposted = 0;
        while ((len = vnet_recv(n, rx, VNET_BUF_SIZE)) != 0) {
            reposted = 1;
            if (len < 0)
                return bench_fail("malformed rx completion after %lu frames", got);
            last_progress = rdtsc();
            if (verify) {
                struct np_hdr h;
                if (!np_is_ours(rx, (u32)len)) {
                    foreign++;
                    continue;
                }
                memcpy(&h, rx + NP_HDR_OFF, sizeof(h));
                if (h.nonce != nonce) {
                    foreign++;
                    continue;
                }
                int ok = (u32)len == size && h.seq == (u32)got;
                if (ok && verify >= 2)
                    ok = np_check(rx, (u32)len, &h, 1) == 0;
                if (!ok && bad++ < 3)
                    printf("netbench: frame %lu: %d bytes, seq %u\n", got, len, h.seq);
            }
            got++;
        }
        if (reposted)
            vnet_rx_kick(n);
    }
    u64 cycles = rdtsc() - t0;
    u64 lost = sent - got;
    printf("netbench: notifications tx sent=%lu suppressed=%lu, rx sent=%lu suppressed=%lu, foreign=%lu\n",
           n->tx.stat_kicks, n->tx.stat_kicks_skipped, n->rx.stat_kicks, n->rx.stat_kicks_skipped, foreign);
    if (g_tsc_khz) {
        u64 pps = rate_per_sec(got, cycles);
        printf("PPS=%lu Mbps=%lu tx=%lu rx=%lu lost=%lu bad=%lu cycles=%lu tsc_khz=%lu size=%u window=%u\n", pps,
               pps * size * 8 / 1000000, sent, got, lost, bad, cycles, g_tsc_khz, size, window);
    } else {
        printf("PPS=unknown tx=%lu rx=%lu lost=%lu bad=%lu cycles=%lu tsc_khz=0 size=%u window=%u\n", sent, got, lost,
               bad, cycles, size, window);
    }
    if (lost || bad)
        return bench_fail("%lu frames lost, %lu wrong", lost, bad);
    return 0;
}
