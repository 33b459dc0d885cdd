/* The dirty-page log of a live migration (vhost-user "Migration").
 *
 * While the front-end migrates the guest it copies guest memory in rounds
 * and must know which pages changed behind its back: every byte the back-end
 * writes into guest memory (used-ring entries, blk read data and status,
 * net rx frames) is marked in the front-end's bitmap, one bit per 4 KiB
 * page of guest-physical address space, with atomic ORs (the front-end and
 * other queues change it at the same time).  Callers check dev->log_on
 * first, so none of this runs while no migration is under way; they hold
 * the queue's lock, so the log cannot be swapped under them (engine.c). */
#define _GNU_SOURCE
#include <unistd.h>

#include "vd.h"

/* 0, or -1 when part of [gpa, gpa+len) is beyond the log. */
static int mark(struct vd_device *d, uint64_t gpa, uint64_t len)
{
    if (!len)
        return 0;
    uint64_t last_byte = gpa + len - 1;
    if (last_byte < gpa)
        return -1; /* wraps */
    uint64_t first = gpa / VD_LOG_PAGE, last = last_byte / VD_LOG_PAGE;
    if (last / 8 >= d->log_size)
        return -1;
    for (uint64_t page = first; page <= last; page++)
        __atomic_fetch_or(&d->log[page / 8], (uint8_t)(1u << (page % 8)), __ATOMIC_RELAXED);
    return 0;
}

void vd_log_iov(struct vd_queue *q, const struct vd_mem *m, const struct iovec *iov, int n, uint64_t len)
{
    for (int i = 0; i < n && len; i++) {
        uint64_t chunk = iov[i].iov_len < len ? iov[i].iov_len : len;
        uint64_t gpa;
        /* Each iovec lies inside one region: vd_mem_map split them so. */
        if (vd_mem_host_gpa(m, iov[i].iov_base, &gpa) < 0 || mark(q->dev, gpa, chunk) < 0) {
            vd_queue_fail(q, "queue %d: a write into guest memory is beyond the dirty log of %llu bytes "
                          "(the front-end's SET_LOG_BASE does not cover guest memory)",
                          q->index, (unsigned long long)q->dev->log_size);
            return;
        }
        len -= chunk;
    }
    q->log_marked = 1;
}

void vd_log_used(struct vd_queue *q, uint64_t off, uint64_t len)
{
    if (!q->log_used)
        return;
    if (mark(q->dev, q->used_gpa + off, len) < 0) {
        vd_queue_fail(q, "queue %d: its used ring (log address %#llx) is beyond the dirty log of %llu bytes",
                      q->index, (unsigned long long)q->used_gpa, (unsigned long long)q->dev->log_size);
        return;
    }
    q->log_marked = 1;
}

void vd_log_kick(struct vd_queue *q)
{
    if (!q->log_marked)
        return;
    q->log_marked = 0;
    uint64_t one = 1;
    if (q->dev->log_fd >= 0 && write(q->dev->log_fd, &one, sizeof(one)) < 0) {
        /* a saturated or closed eventfd: the front-end reads the log anyway */
    }
}
