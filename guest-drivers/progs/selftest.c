/* selftest: checks every virtio device the boot info lists.
 *
 * blk: capacity, serial (GET_ID), distinct patterns written across the whole
 *      disk (start, middle, end, random sectors and extents), read back and
 *      compared, flush, out-of-range and unknown requests refused, and
 *      WRITE_ZEROES when offered.
 * net: frames of many sizes with a sequence number and checksum, checked
 *      byte for byte on return: net=loopback (own frames come back),
 *      net=peer (two guests on a switch exchange frames), net=none.
 * garbage=KIND: instead of testing, write malformed descriptors into the
 *      queues and kick (robustness tests of the back-end), then exit 0.
 *
 * Ends with "SELFTEST PASS" (exit 0) or "SELFTEST FAIL: reason" (exit 1).
 * See ../README.md for every option and output line.
 */
#include "netproto.h"
#include "rt.h"
#include "virtio_blk.h"
#include "virtio_net.h"

static char first_failure[200];
static int failures;

static void fail(const char *dev, const char *fmt, ...) PRINTF_LIKE(2, 3);
static void fail(const char *dev, const char *fmt, ...)
{
    char msg[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    printf("%s: FAIL: %s\n", dev, msg);
    if (!failures++)
        snprintf(first_failure, sizeof(first_failure), "%s: %s", dev, msg);
}

static u64 g_nonce;

/* ================================================================ blk */

struct extent {
    u64 sector;
    u32 nsect;
};

struct job {
    u32 type;
    u64 sector;
    void *buf;
    u32 len;
    int status; /* -1 until completed */
};

/* Sector contents: a pure function of (nonce, sector), the first 16 bytes
 * readable in a hex dump ("VHGTSECT" + sector number). */
static void sector_pattern(u8 *p, u64 sector)
{
    memcpy(p, "VHGTSECT", 8);
    memcpy(p + 8, &sector, 8);
    u64 s = mix64(g_nonce ^ (sector * 0x9e3779b97f4a7c15ull));
    for (u32 i = 16; i < SECTOR_SIZE; i += 8) {
        s = mix64(s + i);
        memcpy(p + i, &s, 8);
    }
}

static int overlaps(const struct extent *e, u32 n, u64 sector, u32 nsect)
{
    for (u32 i = 0; i < n; i++)
        if (sector < e[i].sector + e[i].nsect && e[i].sector < sector + nsect)
            return 1;
    return 0;
}

static u32 add_extent(struct extent *e, u32 n, u32 max, u64 cap, u64 sector, u32 nsect)
{
    if (n >= max || nsect == 0 || sector >= cap || nsect > cap - sector || overlaps(e, n, sector, nsect))
        return n;
    e[n].sector = sector;
    e[n].nsect = nsect;
    return n + 1;
}

/* Run jobs with up to `depth` in flight, spread over the device's queues.
 * Returns 0, or -1 if the device stopped answering or broke a queue. */
static int run_jobs(struct vblk *b, struct job *jobs, u32 n, u32 depth)
{
    u32 next = 0, done = 0, inflight = 0;
    u64 last_progress = rdtsc();
    for (u32 i = 0; i < n; i++)
        jobs[i].status = -1;
    while (done < n) {
        int submitted = 0;
        while (next < n && inflight < depth) {
            u32 qi = next % b->nq;
            struct vblk_req *r = vblk_req_alloc();
            r->user = next;
            struct job *j = &jobs[next];
            int rc = vblk_submit(b, qi, r, j->type, j->sector, j->buf, j->len);
            if (rc == -1)
                break; /* ring full: complete some first */
            if (rc < 0) {
                fail(b->dev.name, "cannot submit request %u (type %u, %u bytes)", next, j->type, j->len);
                return -1;
            }
            next++;
            inflight++;
            submitted = 1;
        }
        if (submitted)
            for (u32 qi = 0; qi < b->nq; qi++)
                vblk_kick(b, qi);
        for (u32 qi = 0; qi < b->nq; qi++) {
            struct vblk_req *r;
            int err = 0;
            while ((r = vblk_poll(b, qi, &err))) {
                jobs[r->user].status = r->status;
                done++;
                inflight--;
                last_progress = rdtsc();
            }
            if (err) {
                fail(b->dev.name, "queue %u returned a bad used entry", qi);
                return -1;
            }
        }
        if (rdtsc() - last_progress > b->timeout_cycles) {
            fail(b->dev.name, "%u requests in flight, none completed for %lu ms", inflight,
                 cycles_to_us(b->timeout_cycles) / 1000);
            return -1;
        }
    }
    return 0;
}

static void sanitize(char *s)
{
    for (; *s; s++)
        if (*s < 0x20 || *s > 0x7e)
            *s = '?';
}

static int expect_status(struct vblk *b, const char *what, int got, int want)
{
    if (got == want)
        return 0;
    fail(b->dev.name, "%s: status %d, expected %d", what, got, want);
    return -1;
}

static void blk_test(u32 devidx, u64 base, const char *name)
{
    struct vblk *b = zalloc(sizeof(*b), 64);
    struct vblk_opts o;
    vblk_default_opts(&o);
    o.queues = (u32)cmd_u64("blk_queues", 4);
    o.event_idx = !cmd_is("event_idx", "0", 0);
    o.indirect = !cmd_is("indirect", "0", 0);
    o.packed = !cmd_is("packed", "0", 0);
    o.queue_size = (u32)cmd_u64("queue_size", 0);
    if (vblk_init(b, base, name, &o) < 0) {
        fail(name, "device initialisation failed");
        return;
    }
    printf("%s: device=%u mmio=0x%lx features=0x%lx queues=%u/%u queue_size=%u ring=%s\n", name, devidx, base,
           b->dev.features, b->nq, b->num_queues, b->q[0].size, b->q[0].packed ? "packed" : "split");
    printf("%s: capacity=%lu\n", name, b->capacity);
    printf("%s: blk_size=%u size_max=%u seg_max=%u ro=%d flush=%d write_zeroes=%d discard=%d\n", name, b->blk_size,
           b->size_max, b->seg_max, b->ro, b->can_flush, b->can_write_zeroes, b->can_discard);
    char serial[VIRTIO_BLK_ID_BYTES + 1];
    int st = vblk_get_id(b, serial);
    sanitize(serial);
    if (expect_status(b, "GET_ID", st, VIRTIO_BLK_S_OK) == 0)
        printf("%s: serial=%s\n", name, serial);
    if (b->capacity == 0) {
        fail(name, "capacity is 0");
        return;
    }
    if (cmd_is("blk", "none", 0)) {
        printf("%s: blk=none: data checks skipped\n", name);
        return;
    }
    u64 cap = b->capacity;

    /* the extents: fixed ones at the edges and middle, then random ones */
    u32 nrand = (u32)cmd_u64("blk_random", 300), nrext = (u32)cmd_u64("blk_extents", 24);
    u32 max = nrand + nrext + 16, n = 0;
    struct extent *ext = alloc(sizeof(*ext) * max, 8);
    n = add_extent(ext, n, max, cap, 0, 1);
    n = add_extent(ext, n, max, cap, cap / 2, 1);
    n = add_extent(ext, n, max, cap, cap - 1, 1);
    n = add_extent(ext, n, max, cap, 8, 8);                   /* 4 KiB near the start */
    n = add_extent(ext, n, max, cap, cap - 9, 8);             /* 4 KiB next to the last sector */
    n = add_extent(ext, n, max, cap, cap / 2 + 1, 7);         /* odd length next to the middle */
    n = add_extent(ext, n, max, cap, cap / 4 & ~7ull, 256);   /* 128 KiB */
    n = add_extent(ext, n, max, cap, cap / 4 * 3 & ~7ull, 2048); /* 1 MiB */
    struct rng r;
    rng_seed(&r, g_nonce ^ devidx);
    for (u32 i = 0, tries = 0; i < nrand && tries < nrand * 4; tries++)
        if (add_extent(ext, n, max, cap, rng_below(&r, cap), 1) != n)
            n++, i++;
    for (u32 i = 0, tries = 0; i < nrext && tries < nrext * 4; tries++) {
        u32 len = 2 + (u32)rng_below(&r, 63);
        if (cap > len && add_extent(ext, n, max, cap, rng_below(&r, cap - len), len) != n)
            n++, i++;
    }
    u64 total = 0;
    for (u32 i = 0; i < n; i++)
        total += ext[i].nsect;

    u32 depth = (u32)cmd_u64("blk_depth", 16);
    if (depth == 0)
        depth = 1;
    struct job *jobs = alloc(sizeof(*jobs) * n, 8);
    u8 **bufs = alloc(sizeof(u8 *) * n, 8);
    for (u32 i = 0; i < n; i++)
        bufs[i] = alloc((u64)ext[i].nsect * SECTOR_SIZE, SECTOR_SIZE);

    if (!b->ro) {
        for (u32 i = 0; i < n; i++) {
            for (u32 s = 0; s < ext[i].nsect; s++)
                sector_pattern(bufs[i] + (u64)s * SECTOR_SIZE, ext[i].sector + s);
            jobs[i] = (struct job){VIRTIO_BLK_T_OUT, ext[i].sector, bufs[i], ext[i].nsect * SECTOR_SIZE, -1};
        }
        if (run_jobs(b, jobs, n, depth) < 0)
            return;
        u32 bad = 0;
        for (u32 i = 0; i < n; i++)
            if (jobs[i].status != VIRTIO_BLK_S_OK && bad++ < 5)
                fail(name, "write of %u sectors at %lu: status %d", ext[i].nsect, ext[i].sector, jobs[i].status);
        if (bad)
            return;
        if (b->can_flush &&
            expect_status(b, "FLUSH", vblk_do(b, VIRTIO_BLK_T_FLUSH, 0, 0, 0), VIRTIO_BLK_S_OK) < 0)
            return;
    } else {
        /* read-only: writes must fail, reads must work (contents unknown) */
        u8 *one = zalloc(SECTOR_SIZE, 4096);
        expect_status(b, "write to a read-only disk", vblk_do(b, VIRTIO_BLK_T_OUT, 0, one, SECTOR_SIZE),
                      VIRTIO_BLK_S_IOERR);
    }

    /* read everything back into poisoned buffers */
    for (u32 i = 0; i < n; i++) {
        memset(bufs[i], 0xee, (u64)ext[i].nsect * SECTOR_SIZE);
        jobs[i] = (struct job){VIRTIO_BLK_T_IN, ext[i].sector, bufs[i], ext[i].nsect * SECTOR_SIZE, -1};
    }
    if (run_jobs(b, jobs, n, depth) < 0)
        return;
    u32 bad = 0, verified = 0;
    u8 expect[SECTOR_SIZE];
    for (u32 i = 0; i < n; i++) {
        if (jobs[i].status != VIRTIO_BLK_S_OK) {
            if (bad++ < 5)
                fail(name, "read of %u sectors at %lu: status %d", ext[i].nsect, ext[i].sector, jobs[i].status);
            continue;
        }
        if (b->ro)
            continue;
        for (u32 s = 0; s < ext[i].nsect; s++) {
            sector_pattern(expect, ext[i].sector + s);
            const u8 *got = bufs[i] + (u64)s * SECTOR_SIZE;
            if (memcmp(expect, got, SECTOR_SIZE) != 0) {
                u32 off = 0;
                while (off < SECTOR_SIZE && expect[off] == got[off])
                    off++;
                if (bad++ < 5)
                    fail(name, "sector %lu: data differs at byte %u (read 0x%02x, wrote 0x%02x)",
                         ext[i].sector + s, off, got[off], expect[off]);
            } else {
                verified++;
            }
        }
    }
    if (bad)
        return;
    if (b->ro)
        printf("%s: read-only: %u extents (%lu sectors) read, write refused\n", name, n, total);
    else
        printf("%s: wrote %u extents (%lu sectors) across the disk, read back and verified %u sectors%s\n", name, n,
               total, verified, b->can_flush ? ", flush ok" : "");

    /* requests the device must refuse */
    u8 *two = zalloc(2 * SECTOR_SIZE, 4096);
    expect_status(b, "read at sector=capacity", vblk_do(b, VIRTIO_BLK_T_IN, cap, two, SECTOR_SIZE),
                  VIRTIO_BLK_S_IOERR);
    expect_status(b, "read across the end", vblk_do(b, VIRTIO_BLK_T_IN, cap - 1, two, 2 * SECTOR_SIZE),
                  VIRTIO_BLK_S_IOERR);
    expect_status(b, "unknown request type 0x7f", vblk_do(b, 0x7f, 0, two, SECTOR_SIZE), VIRTIO_BLK_S_UNSUPP);

    /* InterruptStatus shows used buffers until InterruptACK (every driver
     * that takes interrupts does this; vhostd's VMM answers in its C loop).
     * With packed rings a transport may keep bit 0 set (vhostd's VMM does:
     * no used index tells it what was acknowledged), which only costs a
     * driver a look at its rings. */
    u32 isr = mmio_read32(b->dev.base + VIRTIO_MMIO_INTERRUPT_STATUS);
    mmio_write32(b->dev.base + VIRTIO_MMIO_INTERRUPT_ACK, isr);
    u32 acked = mmio_read32(b->dev.base + VIRTIO_MMIO_INTERRUPT_STATUS);
    int packed = b->q[0].packed;
    if (!(isr & 1) || ((acked & 1) && !packed))
        fail(name, "InterruptStatus 0x%x after requests, 0x%x after InterruptACK", isr, acked);
    else
        printf("%s: InterruptStatus 0x%x, after InterruptACK 0x%x%s\n", name, isr, acked,
               (acked & 1) ? " (packed rings: bit 0 kept set)" : "");

    /* WRITE_ZEROES on one of the extents, then it must read as zeroes */
    if (b->can_write_zeroes && !b->ro && n > 3) {
        struct {
            u64 sector;
            u32 num_sectors;
            u32 flags;
        } *seg = zalloc(16, 64);
        const struct extent *e = &ext[3]; /* the 4 KiB extent at sector 8 */
        seg->sector = e->sector;
        seg->num_sectors = e->nsect;
        if (expect_status(b, "WRITE_ZEROES", vblk_do(b, VIRTIO_BLK_T_WRITE_ZEROES, 0, seg, 16), VIRTIO_BLK_S_OK) ==
            0) {
            u8 *z = alloc((u64)e->nsect * SECTOR_SIZE, 4096);
            memset(z, 0xee, (u64)e->nsect * SECTOR_SIZE);
            if (expect_status(b, "read after WRITE_ZEROES",
                              vblk_do(b, VIRTIO_BLK_T_IN, e->sector, z, e->nsect * SECTOR_SIZE), VIRTIO_BLK_S_OK) == 0) {
                for (u32 k = 0; k < e->nsect * SECTOR_SIZE; k++)
                    if (z[k]) {
                        fail(name, "WRITE_ZEROES: sector %lu byte %u reads 0x%02x", e->sector + k / SECTOR_SIZE,
                             k % SECTOR_SIZE, z[k]);
                        break;
                    }
            }
        }
    }
    u64 kicks = 0, skipped = 0;
    for (u32 qi = 0; qi < b->nq; qi++)
        kicks += b->q[qi].stat_kicks, skipped += b->q[qi].stat_kicks_skipped;
    printf("%s: notifications sent=%lu suppressed=%lu\n", name, kicks, skipped);
}

/* ================================================================ net */

static void fmt_mac(char out[18], const u8 m[6])
{
    snprintf(out, 18, "%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5]);
}

/* loopback: every frame sent comes back, in order, byte for byte */
static void net_loopback(struct vnet *n, const char *name, u32 count, u64 timeout)
{
    u8 *tx = alloc(NP_MAX_FRAME, 64), *rx = alloc(VNET_BUF_SIZE, 64), *exp = alloc(NP_MAX_FRAME, 64);
    u32 window = (u32)cmd_u64("net_window", 32);
    if (window > n->nrx / 2u)
        window = n->nrx / 2u;
    if (window == 0)
        window = 1;
    u32 nonce = (u32)g_nonce;
    u32 sent = 0, got = 0, foreign = 0;
    u64 t0 = rdtsc(), last = t0;
    while (got < count) {
        if (vnet_reap_tx(n) < 0) {
            fail(name, "tx queue returned a bad used entry");
            return;
        }
        int queued = 0;
        while (sent < count && sent - got < window) {
            u32 len = np_data_len(nonce, sent);
            np_build(tx, len, n->mac, n->mac, NP_DATA, sent, nonce, 0, 1);
            int rc = vnet_send(n, tx, len);
            if (rc == -1)
                break;
            if (rc < 0) {
                fail(name, "cannot send frame %u (%u bytes)", sent, len);
                return;
            }
            sent++;
            queued = 1;
        }
        if (queued)
            vnet_tx_kick(n);
        int len, reposted = 0;
        while ((len = vnet_recv(n, rx, VNET_BUF_SIZE)) != 0) {
            reposted = 1;
            if (len < 0) {
                fail(name, "malformed rx completion after %u frames", got);
                return;
            }
            struct np_hdr h;
            if (!np_is_ours(rx, (u32)len) || (memcpy(&h, rx + NP_HDR_OFF, sizeof(h)), h.nonce != nonce)) {
                if (foreign++ < 3)
                    printf("%s: ignoring a frame that is not ours (%d bytes)\n", name, len);
                continue;
            }
            if (h.seq != got) {
                fail(name, "frame %u came back as frame number %u (lost, duplicated or reordered)", h.seq, got);
                return;
            }
            u32 want = np_data_len(nonce, got);
            np_build(exp, want, n->mac, n->mac, NP_DATA, got, nonce, 0, 1);
            if ((u32)len != want || memcmp(exp, rx, want) != 0) {
                u32 off = 0;
                while (off < want && off < (u32)len && exp[off] == rx[off])
                    off++;
                fail(name, "frame %u: %d bytes back for %u sent, first difference at byte %u", got, len, want, off);
                return;
            }
            got++;
            last = rdtsc();
        }
        if (reposted)
            vnet_rx_kick(n);
        if (rdtsc() - last > timeout) {
            fail(name, "net=loopback: %u of %u frames came back, none for %lu ms (is the port a vhostd loopback?)",
                 got, count, cycles_to_us(timeout) / 1000);
            return;
        }
    }
    u64 cyc = rdtsc() - t0;
    printf("%s: net=loopback sent=%u received=%u verified=%u cycles=%lu\n", name, sent, got, got, cyc);
}

/* peer: two guests on one switch.  Each broadcasts `count` DATA frames and
 * must receive the other's `count`, in order and intact.  CTRL frames carry
 * how many DATA frames were received; they are sent every 2 ms until the
 * peer is seen (its rx queue is then running, so nothing sent is dropped),
 * and a window of unacknowledged DATA frames keeps the peer's rx ring from
 * overflowing. */
static void net_peer(struct vnet *n, const char *name, u32 count, u64 timeout)
{
    u8 *tx = alloc(NP_MAX_FRAME, 64), *rx = alloc(VNET_BUF_SIZE, 64);
    u32 window = (u32)cmd_u64("net_window", 32);
    if (window > n->nrx / 4u)
        window = n->nrx / 4u;
    if (window == 0)
        window = 1;
    u32 nonce = (u32)g_nonce;
    u32 sent = 0, got = 0, acked = 0, ctrl_seq = 0, peer_nonce = 0, foreign = 0;
    int peer_seen = 0;
    u8 peer_mac[6] = {0};
    u64 heartbeat = us_to_cycles(2000), linger = us_to_cycles(50000);
    u64 t0 = rdtsc(), last_ctrl = 0, last_progress = t0, done_at = 0;
    u32 acked_sent = ~0u;
    for (;;) {
        u64 now = rdtsc();
        int finished = got == count && acked == count;
        if (finished && !done_at)
            done_at = now;
        if (done_at && now - done_at > linger)
            break;
        if (now - last_progress > timeout) {
            if (!peer_seen)
                fail(name, "net=peer: no frame from a peer for %lu ms (is another selftest net=peer on the switch?)",
                     cycles_to_us(timeout) / 1000);
            else
                fail(name, "net=peer: stalled: sent=%u acked=%u received=%u of %u", sent, acked, got, count);
            return;
        }
        if (vnet_reap_tx(n) < 0) {
            fail(name, "tx queue returned a bad used entry");
            return;
        }
        int queued = 0;
        /* CTRL: periodically, and whenever the received count moved by 8 or completed */
        if (now - last_ctrl > heartbeat || (got != acked_sent && (got % 8 == 0 || got == count))) {
            np_build(tx, NP_MIN_FRAME, NP_BROADCAST, n->mac, NP_CTRL, ctrl_seq, nonce, got, 0);
            if (vnet_send(n, tx, NP_MIN_FRAME) == 0) {
                ctrl_seq++;
                last_ctrl = now;
                acked_sent = got;
                queued = 1;
            }
        }
        while (peer_seen && sent < count && sent - acked < window) {
            u32 len = np_data_len(nonce, sent);
            np_build(tx, len, NP_BROADCAST, n->mac, NP_DATA, sent, nonce, 0, 1);
            if (vnet_send(n, tx, len) != 0)
                break;
            sent++;
            queued = 1;
        }
        if (queued)
            vnet_tx_kick(n);
        int len, reposted = 0;
        while ((len = vnet_recv(n, rx, VNET_BUF_SIZE)) != 0) {
            reposted = 1;
            if (len < 0) {
                fail(name, "malformed rx completion");
                return;
            }
            struct np_hdr h;
            const char *why = np_check(rx, (u32)len, &h, 1);
            if (!np_is_ours(rx, (u32)len) || h.nonce == nonce || memcmp(rx + 6, n->mac, 6) == 0) {
                if (foreign++ < 3)
                    printf("%s: ignoring a frame that is not a peer's (%d bytes)\n", name, len);
                continue;
            }
            if (!peer_seen) {
                peer_seen = 1;
                peer_nonce = h.nonce;
                memcpy(peer_mac, rx + 6, 6);
                char m[18];
                fmt_mac(m, peer_mac);
                printf("%s: peer=%s\n", name, m);
                last_progress = rdtsc();
            } else if (h.nonce != peer_nonce || memcmp(rx + 6, peer_mac, 6) != 0) {
                if (foreign++ < 3)
                    printf("%s: ignoring a frame from a third guest\n", name);
                continue;
            }
            if (why) {
                fail(name, "frame from the peer (%s seq %u, %d bytes): %s", h.kind == NP_DATA ? "DATA" : "CTRL", h.seq,
                     len, why);
                return;
            }
            if (h.kind == NP_CTRL) {
                if (h.acked > sent) {
                    fail(name, "peer acknowledges %u frames, only %u sent", h.acked, sent);
                    return;
                }
                if (h.acked > acked) {
                    acked = h.acked;
                    last_progress = rdtsc();
                }
            } else if (h.kind == NP_DATA) {
                if (h.seq != got || got >= count) {
                    fail(name, "DATA frame %u arrived when %u was next (lost, duplicated or reordered)", h.seq, got);
                    return;
                }
                if ((u32)len != np_data_len(h.nonce, h.seq)) {
                    fail(name, "DATA frame %u: %d bytes, the sender makes it %u", h.seq, len,
                         np_data_len(h.nonce, h.seq));
                    return;
                }
                got++;
                last_progress = rdtsc();
            }
        }
        if (reposted)
            vnet_rx_kick(n);
    }
    printf("%s: net=peer sent=%u received=%u verified=%u acked=%u cycles=%lu\n", name, sent, got, got, acked,
           rdtsc() - t0);
}

static void net_test(u32 devidx, u64 base, const char *name)
{
    struct vnet *n = zalloc(sizeof(*n), 64);
    struct vnet_opts o;
    vnet_default_opts(&o);
    o.event_idx = !cmd_is("event_idx", "0", 0);
    o.indirect = !cmd_is("indirect", "0", 0);
    o.mrg_rxbuf = !cmd_is("mrg_rxbuf", "0", 0);
    o.packed = !cmd_is("packed", "0", 0);
    o.queue_size = (u32)cmd_u64("queue_size", 0);
    o.split_hdr = 2; /* alternate one and two descriptors per frame */
    if (vnet_init(n, base, name, &o, g_nonce ^ devidx) < 0) {
        fail(name, "device initialisation failed");
        return;
    }
    char m[18];
    fmt_mac(m, n->mac);
    printf("%s: device=%u mmio=0x%lx features=0x%lx queue_size=%u/%u mrg_rxbuf=%d ring=%s\n", name, devidx, base,
           n->dev.features, n->rx.size, n->tx.size, n->mrg_rxbuf, n->rx.packed ? "packed" : "split");
    printf("%s: mac=%s%s\n", name, m, n->mac_from_device ? "" : " (driver-chosen, no VIRTIO_NET_F_MAC)");
    printf("%s: link=%s mtu=%u\n", name, vnet_link_up(n) ? "up" : "down", n->mtu);

    char mode[16] = "loopback";
    cmd_get("net", mode, sizeof(mode));
    u32 count = (u32)cmd_u64("net_count", 100);
    u64 timeout = us_to_cycles(cmd_u64("net_timeout_ms", 30000) * 1000);
    if (strcmp(mode, "none") == 0) {
        printf("%s: net=none: frame checks skipped\n", name);
    } else if (strcmp(mode, "loopback") == 0) {
        net_loopback(n, name, count, timeout);
    } else if (strcmp(mode, "peer") == 0) {
        net_peer(n, name, count, timeout);
    } else {
        fail(name, "unknown net=%s (loopback, peer or none)", mode);
    }
    if (n->rx_errors)
        fail(name, "%lu malformed rx completions", n->rx_errors);
    printf("%s: notifications sent=%lu suppressed=%lu (tx) %lu/%lu (rx)\n", name, n->tx.stat_kicks,
           n->tx.stat_kicks_skipped, n->rx.stat_kicks, n->rx.stat_kicks_skipped);
}

/* ================================================================ garbage */

/* Malformed descriptors, one kind per avail entry.  A conforming device
 * marks the queue broken at the first one; none of it may hurt anything but
 * this guest's own queue. */
static u32 garbage_queue(struct virtq *q, struct vdev *d, const char *kind)
{
    u64 page = gpa(zalloc(4096, 4096)), mem = g_boot->memory;
    struct vring_desc *t = zalloc(4 * sizeof(*t), 64); /* an indirect table */
    struct vring_desc *desc = q->desc;
    u16 sz = q->size, n = 0;
    int all = strcmp(kind, "all") == 0 || strcmp(kind, "1") == 0;
#define KIND(k) (all || strcmp(kind, k) == 0)
#define SLOT(d) (u16)((d) % sz)
#define PUT(head) (q->avail->ring[(q->next_avail + n++) & (sz - 1)] = (u16)(head))
    if (KIND("loop")) { /* two descriptors chained to each other */
        desc[SLOT(0)] = (struct vring_desc){page, 16, VRING_DESC_F_NEXT, SLOT(1)};
        desc[SLOT(1)] = (struct vring_desc){page + 16, 16, VRING_DESC_F_NEXT, SLOT(0)};
        PUT(SLOT(0));
    }
    if (KIND("addr")) { /* far outside RAM; straddling the end of RAM */
        desc[SLOT(2)] = (struct vring_desc){0xfffffffffffff000ull, 512, VRING_DESC_F_NEXT, SLOT(3)};
        desc[SLOT(3)] = (struct vring_desc){mem - 256, 4096, VRING_DESC_F_WRITE, 0};
        PUT(SLOT(2));
    }
    if (KIND("len")) { /* a 4 GiB - 1 buffer, and a chain whose lengths add up past 2^32 */
        desc[SLOT(4)] = (struct vring_desc){page, 0xffffffffu, VRING_DESC_F_NEXT, SLOT(5)};
        desc[SLOT(5)] = (struct vring_desc){page, 0xffffffffu, VRING_DESC_F_WRITE, 0};
        PUT(SLOT(4));
    }
    if (KIND("next")) { /* next index beyond the table */
        desc[SLOT(6)] = (struct vring_desc){page, 16, VRING_DESC_F_NEXT, 0xffff};
        PUT(SLOT(6));
    }
    if (KIND("head")) /* a head index beyond the table */
        PUT(sz + 7);
    if (KIND("indirect")) { /* bad table length; empty table; table looping onto itself, nested indirect */
        t[0] = (struct vring_desc){page, 16, VRING_DESC_F_NEXT, 1};
        t[1] = (struct vring_desc){page, 16, VRING_DESC_F_NEXT, 0};
        t[2] = (struct vring_desc){gpa(t), 64, VRING_DESC_F_INDIRECT, 0};
        desc[SLOT(7)] = (struct vring_desc){gpa(t), 17, VRING_DESC_F_INDIRECT, 0};
        desc[SLOT(8)] = (struct vring_desc){gpa(t), 0, VRING_DESC_F_INDIRECT, 0};
        desc[SLOT(9)] = (struct vring_desc){gpa(t), 64, VRING_DESC_F_INDIRECT, 0};
        desc[SLOT(10)] = (struct vring_desc){gpa(t) + 32, 16, VRING_DESC_F_INDIRECT, 0};
        PUT(SLOT(7));
        PUT(SLOT(8));
        PUT(SLOT(9));
        PUT(SLOT(10));
    }
    u16 newidx = (u16)(q->next_avail + n);
    if (strcmp(kind, "idx") == 0) /* an avail index more than a ring ahead (alone: it hides the rest) */
        newidx = (u16)(q->next_avail + sz + 5);
#undef KIND
#undef SLOT
#undef PUT
    wmb();
    WRITE_ONCE(q->avail->idx, newidx);
    mb();
    vdev_notify(d, q->index);
    return n;
}

static int garbage_mode(struct boot_info *bi, const char *kind)
{
    static const char *kinds[] = {"1", "all", "loop", "addr", "len", "next", "head", "indirect", "idx"};
    int known = 0;
    for (u32 i = 0; i < ARRAY_SIZE(kinds); i++)
        known |= strcmp(kind, kinds[i]) == 0;
    if (!known) {
        printf("SELFTEST FAIL: garbage=%s: kinds are 1 (all), all, loop, addr, len, next, head, indirect, idx\n", kind);
        return 1;
    }
    u32 nblk = 0, nnet = 0;
    struct vdev *devs[BOOT_MAX_DEVICES];
    struct virtq *qs[BOOT_MAX_DEVICES];
    char *names[BOOT_MAX_DEVICES];
    u32 nd = 0;
    for (u32 i = 0; i < bi->num_devices; i++) {
        const struct boot_device *bd = &bi->devices[i];
        char *name = alloc(16, 8);
        if (bd->device_id == VIRTIO_ID_BLK) {
            snprintf(name, 16, "blk%u", nblk++);
            struct vblk *b = zalloc(sizeof(*b), 64);
            struct vblk_opts o;
            vblk_default_opts(&o);
            o.packed = 0; /* the malformations are split-ring ones */
            if (vblk_init(b, bd->mmio_base, name, &o) < 0)
                continue;
            devs[nd] = &b->dev;
            qs[nd] = &b->q[0];
        } else if (bd->device_id == VIRTIO_ID_NET) {
            snprintf(name, 16, "net%u", nnet++);
            struct vnet *n = zalloc(sizeof(*n), 64);
            struct vnet_opts o;
            vnet_default_opts(&o);
            o.packed = 0;
            if (vnet_init(n, bd->mmio_base, name, &o, g_nonce ^ i) < 0)
                continue;
            devs[nd] = &n->dev;
            qs[nd] = &n->tx;
        } else {
            continue;
        }
        names[nd++] = name;
    }
    for (u32 i = 0; i < nd; i++) {
        u32 entries = garbage_queue(qs[i], devs[i], kind);
        printf("garbage: %s queue %u: kind=%s, %u malformed avail entries published and kicked\n", names[i],
               qs[i]->index, kind, entries);
    }
    /* give the back-end time to look at them, then report what it did */
    u64 t0 = rdtsc(), wait = us_to_cycles(cmd_u64("garbage_wait_ms", 500) * 1000);
    while (rdtsc() - t0 < wait)
        cpu_relax();
    for (u32 i = 0; i < nd; i++)
        printf("garbage: %s: used_idx=%u device_status=0x%x\n", names[i], virtq_used_idx(qs[i]), vdev_status(devs[i]));
    printf("SELFTEST GARBAGE DONE devices=%u\n", nd);
    return 0;
}

/* ================================================================ main */

int main(struct boot_info *bi)
{
    g_nonce = mix64(rdtsc() ^ cmd_u64("seed", 0));
    if (cmd_get("seed", 0, 0))
        g_nonce = mix64(cmd_u64("seed", 0));
    printf("selftest: devices=%u memory=%lu MiB free=[0x%lx,0x%lx) cmdline=\"%s\"\n", bi->num_devices,
           bi->memory >> 20, bi->free_start, bi->free_end, bi->cmdline);
    printf("selftest: tsc_khz=%lu (%s)\n", g_tsc_khz, g_tsc_source);

    char kind[16];
    if (cmd_get("garbage", kind, sizeof(kind)) && strcmp(kind, "0") != 0)
        return garbage_mode(bi, kind);

    u32 nblk = 0, nnet = 0;
    for (u32 i = 0; i < bi->num_devices; i++) {
        const struct boot_device *bd = &bi->devices[i];
        char name[16];
        int before = failures;
        if (bd->device_id == VIRTIO_ID_BLK) {
            snprintf(name, sizeof(name), "blk%u", nblk++);
            blk_test(i, bd->mmio_base, name);
        } else if (bd->device_id == VIRTIO_ID_NET) {
            snprintf(name, sizeof(name), "net%u", nnet++);
            net_test(i, bd->mmio_base, name);
        } else {
            printf("dev%u: device id %u at 0x%lx: not tested\n", i, bd->device_id, bd->mmio_base);
            continue;
        }
        printf("%s: %s\n", name, failures == before ? "PASS" : "FAIL");
    }
    if (failures) {
        printf("SELFTEST FAIL: %s\n", first_failure);
        return 1;
    }
    printf("selftest: %u blk and %u net devices checked\n", nblk, nnet);
    printf("SELFTEST PASS\n");
    return 0;
}
