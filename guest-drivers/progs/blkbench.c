/* blkbench: fio-like polled load on one virtio-blk device.
 *
 *   rw=randread|randwrite|read|write  bs=4096  iodepth=32  queues=1
 *   seconds=N | count=N  dev=0  span=BYTES  event_idx=0|1  indirect=0|1  packed=0|1
 *
 * Final line: "IOPS=<n> BW_KiBps=<n> ops=<n> cycles=<n> tsc_khz=<n> ..." or
 * "BLKBENCH FAIL: reason".  See ../README.md.
 */
#include "rt.h"
#include "virtio_blk.h"

#define bench_fail(...) fail_line("BLKBENCH FAIL: ", __VA_ARGS__)

int main(struct boot_info *bi)
{
    char rw[16] = "randread";
    cmd_get("rw", rw, sizeof(rw));
    int is_write = strcmp(rw, "randwrite") == 0 || strcmp(rw, "write") == 0;
    int is_rand = strcmp(rw, "randread") == 0 || strcmp(rw, "randwrite") == 0;
    if (!is_write && !is_rand && strcmp(rw, "read") != 0)
        return bench_fail("rw=%s: use randread, randwrite, read or write", rw);
    u64 bs = cmd_u64("bs", 4096);
    u32 iodepth = (u32)cmd_u64("iodepth", 32);
    u32 queues = (u32)cmd_u64("queues", 1);
    u64 count = cmd_u64("count", 0);
    u64 seconds = cmd_u64("seconds", count ? 0 : 5);
    u32 devno = (u32)cmd_u64("dev", 0);
    if (bs == 0 || bs % SECTOR_SIZE || bs > (1u << 20))
        return bench_fail("bs=%lu: a multiple of 512 up to 1 MiB", bs);
    if (iodepth == 0 || iodepth > 1024)
        return bench_fail("iodepth=%u: 1..1024", iodepth);
    if (queues == 0 || queues > VBLK_MAX_QUEUES)
        return bench_fail("queues=%u: 1..%u", queues, VBLK_MAX_QUEUES);

    u64 base = 0;
    for (u32 i = 0, k = 0; i < bi->num_devices; i++)
        if (bi->devices[i].device_id == VIRTIO_ID_BLK && k++ == devno) {
            base = bi->devices[i].mmio_base;
            break;
        }
    if (!base)
        return bench_fail("no blk device number %u among %u devices", devno, bi->num_devices);

    struct vblk *b = zalloc(sizeof(*b), 64);
    struct vblk_opts o;
    vblk_default_opts(&o);
    o.queues = queues;
    o.event_idx = !cmd_is("event_idx", "0", 0);
    o.indirect = !cmd_is("indirect", "0", 0);
    o.packed = !cmd_is("packed", "0", 0);
    o.queue_size = (u32)cmd_u64("queue_size", 0);
    if (vblk_init(b, base, "blk", &o) < 0)
        return bench_fail("device initialisation failed");
    if (is_write && b->ro)
        return bench_fail("rw=%s on a read-only disk", rw);
    u64 nsect = bs / SECTOR_SIZE;
    u64 span = cmd_u64("span", 0) / SECTOR_SIZE;
    if (!span || span > b->capacity)
        span = b->capacity;
    u64 blocks = span / nsect;
    if (blocks == 0)
        return bench_fail("bs=%lu is larger than the disk (%lu sectors)", bs, b->capacity);

    /* requests and their buffers; one ring slot set per request */
    struct vblk_req **reqs = alloc(sizeof(*reqs) * iodepth, 8);
    for (u32 i = 0; i < iodepth; i++) {
        reqs[i] = vblk_req_alloc();
        reqs[i]->buf = alloc(bs, 4096);
        if (is_write)
            for (u64 k = 0; k < bs; k += 8) {
                u64 v = mix64(i * bs + k);
                memcpy((u8 *)reqs[i]->buf + k, &v, 8);
            }
    }
    printf("blkbench: rw=%s bs=%lu iodepth=%u queues=%u/%u queue_size=%u ring=%s capacity=%lu span=%lu "
           "features=0x%lx\n",
           rw, bs, iodepth, b->nq, b->num_queues, b->q[0].size, b->q[0].packed ? "packed" : "split", b->capacity, span,
           b->dev.features);
    printf("blkbench: %s%lu tsc_khz=%lu (%s)\n", count ? "count=" : "seconds=", count ? count : seconds, g_tsc_khz,
           g_tsc_source);

    struct rng r;
    rng_seed(&r, cmd_u64("seed", 1));
    u32 type = is_write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
    u64 seq_block = 0, submitted = 0, done = 0, errors = 0, lat_sum = 0, lat_max = 0;
    u32 inflight = 0, qnext = 0;
    u64 t0 = rdtsc(), deadline = seconds ? t0 + us_to_cycles(seconds * 1000000) : ~0ull;
    u64 last_progress = t0;
    int stopping = 0;
    u8 kick_mask = 0;

    /* first fill: every request once */
    for (u32 i = 0; i < iodepth && (!count || submitted < count); i++) {
        u64 blk = is_rand ? rng_below(&r, blocks) : seq_block++ % blocks;
        u32 qi = qnext++ % b->nq;
        int rc = vblk_submit(b, qi, reqs[i], type, blk * nsect, reqs[i]->buf, (u32)bs);
        if (rc == -1) {
            /* ring smaller than iodepth: run with what fits */
            printf("blkbench: only %u requests fit the ring(s), iodepth lowered\n", i);
            iodepth = i;
            break;
        }
        if (rc < 0)
            return bench_fail("cannot submit a request of %lu bytes (seg_max %u, size_max %u)", bs, b->seg_max,
                              b->size_max);
        kick_mask |= (u8)(1u << qi);
        submitted++;
        inflight++;
    }
    for (u32 qi = 0; qi < b->nq; qi++)
        if (kick_mask & (1u << qi))
            vblk_kick(b, qi);
    kick_mask = 0;

    while (inflight) {
        u64 now = rdtsc();
        if (!stopping && now >= deadline)
            stopping = 1;
        for (u32 qi = 0; qi < b->nq; qi++) {
            struct vblk_req *req;
            int err = 0;
            while ((req = vblk_poll(b, qi, &err))) {
                u64 t = rdtsc(), lat = t - req->t_submit;
                last_progress = t;
                lat_sum += lat;
                if (lat > lat_max)
                    lat_max = lat;
                inflight--;
                done++;
                if (req->status != VIRTIO_BLK_S_OK && errors++ < 3)
                    printf("blkbench: %s at sector %lu: status %u\n", rw, req->hdr.sector, req->status);
                if (stopping || errors || (count && submitted >= count))
                    continue;
                u64 blk = is_rand ? rng_below(&r, blocks) : seq_block++ % blocks;
                if (vblk_submit(b, qi, req, type, blk * nsect, req->buf, (u32)bs) < 0)
                    return bench_fail("resubmission failed on queue %u", qi);
                submitted++;
                inflight++;
                kick_mask |= (u8)(1u << qi);
            }
            if (err)
                return bench_fail("queue %u returned a bad used entry", qi);
        }
        for (u32 qi = 0; qi < b->nq; qi++)
            if (kick_mask & (1u << qi))
                vblk_kick(b, qi);
        kick_mask = 0;
        if (rdtsc() - last_progress > b->timeout_cycles)
            return bench_fail("%u requests in flight, none completed for %lu ms", inflight,
                              cycles_to_us(b->timeout_cycles) / 1000);
    }
    u64 cycles = rdtsc() - t0;
    if (errors)
        return bench_fail("%lu of %lu requests failed", errors, done);

    u64 kicks = 0, skipped = 0;
    for (u32 qi = 0; qi < b->nq; qi++)
        kicks += b->q[qi].stat_kicks, skipped += b->q[qi].stat_kicks_skipped;
    u64 lat_avg = done ? lat_sum / done : 0;
    printf("blkbench: notifications sent=%lu suppressed=%lu\n", kicks, skipped);
    if (g_tsc_khz) {
        u64 iops = rate_per_sec(done, cycles);
        printf("IOPS=%lu BW_KiBps=%lu ops=%lu cycles=%lu tsc_khz=%lu lat_avg_us=%lu lat_max_us=%lu rw=%s bs=%lu "
               "iodepth=%u queues=%u\n",
               iops, iops * (bs / 1024) + iops * (bs % 1024) / 1024, done, cycles, g_tsc_khz, cycles_to_us(lat_avg),
               cycles_to_us(lat_max), rw, bs, iodepth, b->nq);
    } else {
        printf("IOPS=unknown ops=%lu cycles=%lu tsc_khz=0 lat_avg_cycles=%lu lat_max_cycles=%lu rw=%s bs=%lu "
               "iodepth=%u queues=%u\n",
               done, cycles, lat_avg, lat_max, rw, bs, iodepth, b->nq);
    }
    return 0;
}
