/* virtio-blk device logic (virtio 1.2 section 5.2).
 *
 * Sees one request at a time as iovecs (vd_req); knows nothing of rings or
 * of vhost-user.  Data moves with preadv/pwritev straight between the image
 * and guest memory (no bounce buffer).
 *
 * Without an image (fd < 0) the device is a null disk: requests are checked
 * as usual and then succeed without touching data (reads leave the guest's
 * buffers as they were), flushes, discards and write-zeroes do nothing.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "iov.h"
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

struct vd_blk {
    struct vd_blk_params p;
    int nqueues;
    struct vd_blk_stats st[];
};

vd_blk *vd_blk_new(const struct vd_blk_params *p, int nqueues)
{
    if (nqueues < 1 || nqueues > VD_MAX_QUEUES)
        return NULL;
    vd_blk *b = calloc(1, sizeof(*b) + nqueues * sizeof(struct vd_blk_stats));
    if (!b)
        return NULL;
    b->p = *p;
    b->nqueues = nqueues;
    return b;
}

void vd_blk_free(vd_blk *b)
{
    free(b);
}

void vd_blk_get_stats(vd_blk *b, int queue, struct vd_blk_stats *out)
{
    if (queue >= 0 && queue < b->nqueues)
        *out = b->st[queue];
}

/* Full-length positional I/O over an iovec array (short transfers resumed). */
static int rw_all(int fd, struct iovec *iov, int n, uint64_t off, uint64_t len, int write)
{
    while (len) {
        int cnt = n < IOV_MAX ? n : IOV_MAX;
        ssize_t r = write ? pwritev(fd, iov, cnt, (off_t)off) : preadv(fd, iov, cnt, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO; /* image shrank under us */
        off += r;
        len -= r;
        n = vd_iov_skip_front(&iov, n, r);
    }
    return 0;
}

static int has_image(const vd_blk *b)
{
    return b->p.fd >= 0;
}

static int in_range(const vd_blk *b, uint64_t sector, uint64_t bytes)
{
    uint64_t sectors = bytes / SECTOR;
    return sector <= b->p.capacity && sectors <= b->p.capacity - sector;
}

struct seg {
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;
};

static int punch(const vd_blk *b, uint64_t off, uint64_t len, int zero_only)
{
    if (b->p.is_blockdev) {
        uint64_t range[2] = {off, len};
        return ioctl(b->p.fd, zero_only ? BLKZEROOUT : BLKDISCARD, range) < 0 ? -errno : 0;
    }
    int mode = zero_only ? FALLOC_FL_ZERO_RANGE : (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
    if (fallocate(b->p.fd, mode, (off_t)off, (off_t)len) == 0)
        return 0;
    if (zero_only && (errno == EOPNOTSUPP || errno == EINVAL)) /* e.g. tmpfs: punching also zeroes */
        return fallocate(b->p.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) < 0 ? -errno : 0;
    return -errno;
}

static uint8_t discard_or_zero(vd_blk *b, struct vd_blk_stats *st, struct iovec *data, int ndata, uint64_t len,
                               int zeroes)
{
    uint32_t max_seg = zeroes ? b->p.max_write_zeroes_seg : b->p.max_discard_seg;
    uint32_t max_sectors = zeroes ? b->p.max_write_zeroes_sectors : b->p.max_discard_sectors;
    if (b->p.readonly || !(zeroes ? b->p.write_zeroes : b->p.discard))
        return b->p.readonly ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_UNSUPP;
    if (len == 0 || len % sizeof(struct seg) || len / sizeof(struct seg) > max_seg)
        return VIRTIO_BLK_S_UNSUPP;
    for (uint64_t i = 0; i < len / sizeof(struct seg); i++) {
        struct seg s;
        vd_iov_read(data, ndata, i * sizeof(s), &s, sizeof(s));
        if (s.flags & ~(uint32_t)VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP || (!zeroes && s.flags))
            return VIRTIO_BLK_S_UNSUPP;
        if (s.num_sectors > max_sectors || !in_range(b, s.sector, s.num_sectors * SECTOR))
            return VIRTIO_BLK_S_IOERR;
        if (!s.num_sectors)
            continue;
        /* write-zeroes with UNMAP may deallocate: a punched hole reads as zeroes. */
        int zero_only = zeroes && !(s.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        if (has_image(b) && punch(b, s.sector * SECTOR, s.num_sectors * SECTOR, zero_only) < 0)
            return VIRTIO_BLK_S_IOERR;
    }
    if (zeroes)
        st->write_zeroes++;
    else
        st->discards++;
    return VIRTIO_BLK_S_OK;
}

uint32_t vd_blk_handle(void *ctx, struct vd_req *req, int queue)
{
    vd_blk *b = ctx;
    struct vd_blk_stats *st = &b->st[queue];
    struct {
        uint32_t type, reserved;
        uint64_t sector;
    } hdr;

    if (req->in_bytes < 1) {
        st->errors++; /* nowhere to put a status: the driver gets nothing */
        return 0;
    }
    /* The status byte is the last writable byte; data is what lies between. */
    struct iovec *out = req->iov, *in = req->iov + req->nout;
    struct iovec *last = &in[req->nin - 1]; /* in_bytes >= 1 means at least one writable iovec */
    uint8_t *status = (uint8_t *)last->iov_base + last->iov_len - 1;
    int nin = vd_iov_trim_back(in, req->nin, 1);
    uint64_t in_data = req->in_bytes - 1;
    uint32_t used = 1;
    uint8_t s = VIRTIO_BLK_S_OK;

    if (req->out_bytes < HDR_LEN) {
        st->errors++;
        *status = VIRTIO_BLK_S_IOERR;
        return 1;
    }
    vd_iov_read(out, req->nout, 0, &hdr, HDR_LEN);
    int nout = vd_iov_skip_front(&out, req->nout, HDR_LEN);
    uint64_t out_data = req->out_bytes - HDR_LEN;

    switch (hdr.type) {
    case VIRTIO_BLK_T_IN:
        if (in_data % SECTOR || !in_range(b, hdr.sector, in_data) ||
            (has_image(b) && rw_all(b->p.fd, in, nin, hdr.sector * SECTOR, in_data, 0) < 0)) {
            s = VIRTIO_BLK_S_IOERR;
            break;
        }
        st->reads++;
        st->read_bytes += in_data;
        used += in_data;
        break;
    case VIRTIO_BLK_T_OUT:
        if (b->p.readonly || out_data % SECTOR || !in_range(b, hdr.sector, out_data) ||
            (has_image(b) && rw_all(b->p.fd, out, nout, hdr.sector * SECTOR, out_data, 1) < 0)) {
            s = VIRTIO_BLK_S_IOERR;
            break;
        }
        st->writes++;
        st->write_bytes += out_data;
        break;
    case VIRTIO_BLK_T_FLUSH:
        if (has_image(b) && fdatasync(b->p.fd) < 0)
            s = VIRTIO_BLK_S_IOERR;
        st->flushes++;
        break;
    case VIRTIO_BLK_T_GET_ID: {
        char id[ID_LEN];
        memcpy(id, b->p.serial, ID_LEN);
        uint64_t n = in_data < ID_LEN ? in_data : ID_LEN;
        used += vd_iov_write(in, nin, 0, id, n);
        st->get_ids++;
        break;
    }
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES:
        s = discard_or_zero(b, st, out, nout, out_data, hdr.type == VIRTIO_BLK_T_WRITE_ZEROES);
        break;
    default:
        s = VIRTIO_BLK_S_UNSUPP;
        break;
    }
    if (s == VIRTIO_BLK_S_IOERR)
        st->errors++;
    else if (s == VIRTIO_BLK_S_UNSUPP)
        st->unsupported++;
    *status = s;
    return used;
}
