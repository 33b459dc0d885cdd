/* virtio-blk device logic (virtio 1.2 section 5.2).
 *
 * Sees requests (vd_req: iovecs over guest memory) and its store (store.h:
 * where the data lives); knows nothing of rings, of vhost-user, or of how
 * the store reaches its data.
 *
 * A request is a small state machine over one block operation at a time: a
 * read or write (resumed after a short transfer, in bounce-buffer chunks
 * when the guest's buffers are not what the store takes: unaligned for
 * O_DIRECT, or scattered for a store that wants one buffer), a flush, or one
 * discard/zero per segment.  The store runs each operation at once or
 * completes it later on this request's worker.
 *
 * Without a store the device is a null disk: requests are checked as usual
 * and then succeed without touching data (reads leave the guest's buffers as
 * they were), flushes, discards and write-zeroes do nothing.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "iov.h"
#include "store.h"
#include "vd.h"

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13

#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2

#define VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP 1
#define SECTOR 512ull
#define HDR_LEN 16
#define ID_LEN 20
#define BOUNCE_CHUNK (1u << 20)   /* a bounced transfer goes through the bounce buffer this much at a time */
#define MAX_RETRIES 64            /* EAGAIN/EINTR from an I/O, then it is an error */

struct vd_blk {
    struct vd_blk_params p;
    struct vd_store *store;   /* p.store, with our reference; NULL: a null disk */
    int nqueues;
    int refs;                 /* the control plane's, and its data plane device's */
    struct vd_blk_stats st[];
};

struct seg {
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;
};

/* What a request remembers between its I/Os (vd_req_priv). */
struct blk_req {
    struct vd_io io;          /* the one in flight; first, see blk_io_done */
    vd_blk *b;
    uint8_t *status;          /* the guest's status byte */
    uint8_t type, result;
    uint8_t unmapped;         /* zeroing was refused: deallocating instead (reads back as zeroes too) */
    uint16_t retries;
    struct iovec *data;       /* the data buffers (guest memory), advanced as transfers progress */
    int ndata;
    uint64_t off, len, done;  /* image offset and length of the transfer, bytes done */
    void *bounce;             /* aligned copy of guest data for O_DIRECT, BOUNCE_CHUNK at most */
    size_t bounce_cap;
    struct iovec biov;
    struct seg *segs;         /* discard / write-zeroes segments, copied out of the request */
    uint32_t nseg, seg;
    uint32_t id_len;          /* GET_ID: bytes written */
};

size_t vd_blk_req_size(void)
{
    return sizeof(struct blk_req);
}

vd_blk *vd_blk_new(const struct vd_blk_params *p, int nqueues)
{
    if (nqueues < 1 || nqueues > VD_MAX_QUEUES)
        return NULL;
    vd_blk *b = calloc(1, sizeof(*b) + nqueues * sizeof(struct vd_blk_stats));
    if (!b)
        return NULL;
    b->p = *p;
    b->nqueues = nqueues;
    b->refs = 1;
    b->store = p->store;
    if (b->store)
        vd_store_ref(b->store);
    return b;
}

vd_blk *vd_blk_ref(vd_blk *b)
{
    __atomic_add_fetch(&b->refs, 1, __ATOMIC_RELAXED);
    return b;
}

/* The last reference lets the store go: by then no I/O of ours uses it. */
void vd_blk_unref(void *ctx)
{
    vd_blk *b = ctx;
    if (__atomic_sub_fetch(&b->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        vd_store_unref(b->store);
        free(b);
    }
}

void vd_blk_get_stats(vd_blk *b, int queue, struct vd_blk_stats *out)
{
    if (queue >= 0 && queue < b->nqueues)
        *out = b->st[queue];
}

static int has_store(const vd_blk *b)
{
    return b->store != NULL;
}

static int in_range(const vd_blk *b, uint64_t sector, uint64_t bytes)
{
    uint64_t sectors = bytes / SECTOR;
    return sector <= b->p.capacity && sectors <= b->p.capacity - sector;
}

/* ---------------------------------------------------------------- the I/O of each step */

/* Whether the store can take the guest's buffers as they are. */
static int needs_bounce(const struct vd_store *s, const struct iovec *iov, int n)
{
    if (s->contiguous && n > 1)
        return 1;
    if (s->mem_align == 1 && s->len_align == 1)
        return 0;
    for (int i = 0; i < n; i++)
        if ((uintptr_t)iov[i].iov_base % s->mem_align || iov[i].iov_len % s->len_align)
            return 1;
    return 0;
}

static void prep_rw(struct blk_req *br)
{
    struct vd_io *io = &br->io;
    io->op = br->type == VIRTIO_BLK_T_OUT ? VD_IO_WRITE : VD_IO_READ;
    io->off = br->off + br->done;
    if (br->bounce) {
        uint64_t chunk = br->len - br->done;
        if (chunk > br->bounce_cap)
            chunk = br->bounce_cap;
        if (br->type == VIRTIO_BLK_T_OUT)
            vd_iov_read(br->data, br->ndata, br->done, br->bounce, chunk);
        br->biov = (struct iovec){br->bounce, chunk};
        io->iov = &br->biov;
        io->niov = 1;
    } else {
        io->iov = br->data; /* a store may take fewer (IOV_MAX): a short transfer */
        io->niov = br->ndata;
    }
}

static void prep_segment(struct blk_req *br)
{
    struct vd_io *io = &br->io;
    const struct seg *s = &br->segs[br->seg];
    io->off = s->sector * SECTOR;
    io->len = (uint64_t)s->num_sectors * SECTOR;
    io->op = br->type == VIRTIO_BLK_T_WRITE_ZEROES ? VD_IO_ZERO : VD_IO_DISCARD;
    /* write-zeroes with UNMAP may deallocate: a hole reads as zeroes. */
    io->unmap = io->op == VD_IO_ZERO && (s->flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    br->unmapped = 0;
}

/* Skip segments with nothing to do; 0 when none is left. */
static int next_segment(struct blk_req *br)
{
    while (br->seg < br->nseg && !br->segs[br->seg].num_sectors)
        br->seg++;
    if (br->seg == br->nseg)
        return 0;
    prep_segment(br);
    return 1;
}

/* One I/O of the request finished with res.  Returns 1 with the next I/O
 * prepared in br->io, or 0 when the request is over (br->result set). */
static int advance(struct vd_req *req, struct blk_req *br, int64_t res)
{
    if (!vd_req_live(req)) {
        br->result = VIRTIO_BLK_S_IOERR; /* nobody waits for the rest */
        return 0;
    }
    if ((res == -EAGAIN || res == -EINTR) && br->retries++ < MAX_RETRIES)
        return 1; /* the same I/O again */
    switch (br->type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_OUT:
        if (res <= 0) { /* 0: the image shrank under us */
            br->result = VIRTIO_BLK_S_IOERR;
            return 0;
        }
        if (br->bounce) {
            if (br->type == VIRTIO_BLK_T_IN)
                vd_iov_write(br->data, br->ndata, br->done, br->bounce, (uint64_t)res);
        } else {
            br->ndata = vd_iov_skip_front(&br->data, br->ndata, (uint64_t)res);
        }
        br->done += (uint64_t)res;
        if (br->done >= br->len)
            return 0;
        prep_rw(br);
        return 1;
    case VIRTIO_BLK_T_FLUSH:
        if (res < 0)
            br->result = VIRTIO_BLK_S_IOERR;
        return 0;
    default: /* discard, write-zeroes */
        if (res < 0 && br->io.op == VD_IO_ZERO && !br->io.unmap && (res == -EOPNOTSUPP || res == -EINVAL)) {
            /* e.g. tmpfs cannot zero a range in place: a hole reads as zeroes too */
            br->io.unmap = br->unmapped = 1;
            return 1;
        }
        if (res < 0) {
            br->result = VIRTIO_BLK_S_IOERR;
            return 0;
        }
        br->seg++;
        return next_segment(br);
    }
}

/* The request is over: count it, write the status, say how much was written. */
static void conclude(vd_blk *b, struct vd_req *req, struct blk_req *br)
{
    struct vd_blk_stats *st = &b->st[req->queue];
    uint32_t used = 1;
    if (br->result == VIRTIO_BLK_S_OK) {
        switch (br->type) {
        case VIRTIO_BLK_T_IN:
            st->reads++;
            st->read_bytes += br->len;
            used += (uint32_t)br->len;
            break;
        case VIRTIO_BLK_T_OUT:
            st->writes++;
            st->write_bytes += br->len;
            break;
        case VIRTIO_BLK_T_FLUSH:
            st->flushes++;
            break;
        case VIRTIO_BLK_T_GET_ID:
            st->get_ids++;
            used += br->id_len;
            break;
        case VIRTIO_BLK_T_DISCARD:
            st->discards++;
            break;
        case VIRTIO_BLK_T_WRITE_ZEROES:
            st->write_zeroes++;
            break;
        }
    } else if (br->result == VIRTIO_BLK_S_IOERR) {
        st->errors++;
    } else {
        st->unsupported++;
    }
    if (br->bounce)
        st->bounced++;
    if (vd_req_live(req))
        *br->status = br->result;
    req->used_len = used;
}

/* Start the I/O prepared in br->io, and the ones after it that finish at
 * once.  Returns 1 while one is pending (blk_io_done follows), 0 when the
 * request is over. */
static int run(vd_blk *b, struct vd_req *req, struct blk_req *br)
{
    while (b->store->ops->start(b->store, &br->io)) {
        if (!advance(req, br, br->io.res))
            return 0;
    }
    return 1;
}

/* An I/O finished (on the request's worker): on to the next one, or done.
 * Starting the next is the last thing it does (see vd_reqs_io_done). */
static void blk_io_done(struct vd_io *io, int64_t res)
{
    struct blk_req *br = (struct blk_req *)io; /* io is its first member */
    struct vd_req *req = io->req;
    if (advance(req, br, res) && run(br->b, req, br))
        return;
    conclude(br->b, req, br);
    vd_req_complete(req);
}

/* ---------------------------------------------------------------- requests */

/* Copy the segments out of the request and check them all before any I/O. */
static uint8_t take_segments(vd_blk *b, struct vd_req *req, struct blk_req *br, struct iovec *data, int ndata,
                             uint64_t len, int *retry)
{
    int zeroes = br->type == VIRTIO_BLK_T_WRITE_ZEROES;
    uint32_t max_seg = zeroes ? b->p.max_write_zeroes_seg : b->p.max_discard_seg;
    uint32_t max_sectors = zeroes ? b->p.max_write_zeroes_sectors : b->p.max_discard_sectors;
    if (b->p.readonly || !(zeroes ? b->p.write_zeroes : b->p.discard))
        return b->p.readonly ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_UNSUPP;
    if (len == 0 || len % sizeof(struct seg) || len / sizeof(struct seg) > max_seg)
        return VIRTIO_BLK_S_UNSUPP;
    void *buf;
    int rc = vd_req_buf(req, len, 8, &buf);
    if (rc == VD_REQ_RETRY) {
        *retry = 1;
        return VIRTIO_BLK_S_OK;
    }
    if (rc < 0)
        return VIRTIO_BLK_S_IOERR;
    br->segs = buf;
    br->nseg = (uint32_t)(len / sizeof(struct seg));
    vd_iov_read(data, ndata, 0, br->segs, len);
    for (uint32_t i = 0; i < br->nseg; i++) {
        const struct seg *s = &br->segs[i];
        if (s->flags & ~(uint32_t)VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP || (!zeroes && s->flags))
            return VIRTIO_BLK_S_UNSUPP;
        if (s->num_sectors > max_sectors || !in_range(b, s->sector, s->num_sectors * SECTOR))
            return VIRTIO_BLK_S_IOERR;
    }
    return VIRTIO_BLK_S_OK;
}

int vd_blk_handle(void *ctx, struct vd_req *req)
{
    vd_blk *b = ctx;
    struct blk_req *br = vd_req_priv(req);
    struct {
        uint32_t type, reserved;
        uint64_t sector;
    } hdr;

    if (req->in_bytes < 1) {
        b->st[req->queue].errors++; /* nowhere to put a status: the driver gets nothing */
        req->used_len = 0;
        return VD_REQ_DONE;
    }
    /* The state after io; io itself is set up by prep_* when there is I/O. */
    memset(&br->b, 0, sizeof(*br) - offsetof(struct blk_req, b));
    br->b = b;
    /* The status byte is the last writable byte; data is what lies between. */
    struct iovec *out = req->iov, *in = req->iov + req->nout;
    struct iovec *last = &in[req->nin - 1]; /* in_bytes >= 1 means at least one writable iovec */
    br->status = (uint8_t *)last->iov_base + last->iov_len - 1;
    int nin = vd_iov_trim_back(in, req->nin, 1);
    uint64_t in_data = req->in_bytes - 1;
    br->result = VIRTIO_BLK_S_OK;

    if (req->out_bytes < HDR_LEN) {
        br->result = VIRTIO_BLK_S_IOERR;
        goto done;
    }
    vd_iov_read(out, req->nout, 0, &hdr, HDR_LEN);
    int nout = vd_iov_skip_front(&out, req->nout, HDR_LEN);
    uint64_t out_data = req->out_bytes - HDR_LEN;
    br->type = hdr.type > 0xff ? 0xff : (uint8_t)hdr.type;

    struct vd_io *io = &br->io;
    switch (hdr.type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_OUT: {
        int write = hdr.type == VIRTIO_BLK_T_OUT;
        uint64_t len = write ? out_data : in_data;
        if ((write && b->p.readonly) || len % SECTOR || !in_range(b, hdr.sector, len) ||
            (has_store(b) && (hdr.sector * SECTOR % b->store->len_align || len % b->store->len_align))) {
            br->result = VIRTIO_BLK_S_IOERR;
            goto done;
        }
        br->data = write ? out : in;
        br->ndata = write ? nout : nin;
        br->off = hdr.sector * SECTOR;
        br->len = len;
        if (!has_store(b) || !len)
            goto done;
        if (needs_bounce(b->store, br->data, br->ndata)) {
            size_t cap = len < BOUNCE_CHUNK ? len : BOUNCE_CHUNK;
            int rc = vd_req_buf(req, cap, b->store->mem_align, &br->bounce);
            if (rc == VD_REQ_RETRY)
                return VD_REQ_RETRY;
            if (rc < 0) {
                br->result = VIRTIO_BLK_S_IOERR;
                goto done;
            }
            br->bounce_cap = cap;
        }
        prep_rw(br);
        break;
    }
    case VIRTIO_BLK_T_FLUSH:
        if (!has_store(b))
            goto done;
        io->op = VD_IO_FLUSH;
        break;
    case VIRTIO_BLK_T_GET_ID: {
        char id[ID_LEN];
        memcpy(id, b->p.serial, ID_LEN);
        br->id_len = (uint32_t)vd_iov_write(in, nin, 0, id, in_data < ID_LEN ? in_data : ID_LEN);
        goto done;
    }
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES: {
        int retry = 0;
        br->result = take_segments(b, req, br, out, nout, out_data, &retry);
        if (retry)
            return VD_REQ_RETRY;
        if (br->result != VIRTIO_BLK_S_OK || !has_store(b) || !next_segment(br))
            goto done;
        break;
    }
    default:
        br->result = VIRTIO_BLK_S_UNSUPP;
        goto done;
    }

    io->req = req;
    io->aio = req->aio;
    io->done = blk_io_done;
    if (run(b, req, br))
        return VD_REQ_PENDING;
done:
    conclude(b, req, br);
    return VD_REQ_DONE;
}
