/* Ring-level access for tests (tests/test_ring.py): one queue served by
 * hand, request by request, through the same ring functions the workers
 * use.  The queue must be device-driven (vd_device_set_rx_queues with no
 * rx_kick) so that no worker touches it; the caller plays the device. */
#define _GNU_SOURCE
#include <string.h>

#include "vd.h"

static struct vd_queue *probe_queue(vd_device *d, int i)
{
    return (i >= 0 && i < d->nqueues) ? &d->q[i] : NULL;
}

int vd_probe_pop(vd_device *d, int i, struct vd_probe_chain *out, struct vd_probe_buf *bufs, int max)
{
    struct vd_queue *q = probe_queue(d, i);
    if (!q || max < 1)
        return -1;
    struct vd_req req;
    int r = -1;
    pthread_mutex_lock(&q->lock);
    if (vd_queue_ready(q))
        r = vd_queue_pop(q, &req, q->scratch, VD_MAX_IOV);
    if (r == 1) {
        int n = req.nout + req.nin;
        out->id = req.head;
        out->ndesc = req.ndesc;
        out->nout = req.nout;
        out->nin = req.nin;
        out->out_bytes = req.out_bytes;
        out->in_bytes = req.in_bytes;
        for (int k = 0; k < n && k < max; k++) {
            bufs[k].host = (uint64_t)(uintptr_t)req.iov[k].iov_base;
            bufs[k].len = req.iov[k].iov_len;
        }
    }
    pthread_mutex_unlock(&q->lock);
    return r;
}

void vd_probe_push(vd_device *d, int i, uint16_t id, uint16_t ndesc, uint32_t len)
{
    struct vd_queue *q = probe_queue(d, i);
    if (!q)
        return;
    pthread_mutex_lock(&q->lock);
    if (vd_queue_ready(q))
        vd_queue_push(q, id, ndesc, len);
    pthread_mutex_unlock(&q->lock);
}

void vd_probe_publish(vd_device *d, int i)
{
    struct vd_queue *q = probe_queue(d, i);
    if (!q)
        return;
    pthread_mutex_lock(&q->lock);
    if (vd_queue_ready(q))
        vd_queue_flush(q);
    pthread_mutex_unlock(&q->lock);
}

int vd_probe_notify(vd_device *d, int i, int on)
{
    struct vd_queue *q = probe_queue(d, i);
    int r = -1;
    if (!q)
        return r;
    pthread_mutex_lock(&q->lock);
    if (vd_queue_ready(q)) {
        if (on) {
            r = vd_queue_want_kick(q);
        } else {
            vd_ring_notify_enable(q, 0);
            r = 0;
        }
    }
    pthread_mutex_unlock(&q->lock);
    return r;
}
