/* The file store: an image file or a block device on this host.
 *
 * Its block operations become syscalls (preadv, pwritev, fdatasync,
 * fallocate, and for block devices the BLKDISCARD/BLKZEROOUT ioctls), run
 * by one of the engines of aio.c: io_uring (the worker's ring), the thread
 * pool, or inline (images on memory file systems, where the syscall is a
 * memory copy that cannot hang).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "api.h"
#include "store.h"

#define POOL_SHARE 16 /* thread-pool threads one disk may occupy */

struct file_store {
    struct vd_store s;
    int fd;
    int engine;             /* VD_FILE_* */
    int punt;
    int is_blockdev;
    struct vd_iolimit lim;  /* its share of the thread pool */
};

static int64_t blkdev_ioctl(struct vd_io *io)
{
    uint64_t range[2] = {io->off, io->len};
    return ioctl(io->fd, io->mode ? BLKZEROOUT : BLKDISCARD, range) < 0 ? -errno : 0;
}

static int file_start(struct vd_store *s, struct vd_io *io)
{
    struct file_store *f = (struct file_store *)s;
    io->fd = f->fd;
    switch (io->op) {
    case VD_IO_READ:
        io->sysop = VD_SYS_READV;
        break;
    case VD_IO_WRITE:
        io->sysop = VD_SYS_WRITEV;
        break;
    case VD_IO_FLUSH:
        io->sysop = VD_SYS_FDATASYNC;
        break;
    case VD_IO_DISCARD:
    case VD_IO_ZERO:
        if (f->is_blockdev) {
            io->sysop = VD_SYS_CALL; /* no io_uring opcode for these: the pool runs the ioctl */
            io->call = blkdev_ioctl;
            io->mode = io->op == VD_IO_ZERO;
        } else {
            io->sysop = VD_SYS_FALLOCATE;
            io->mode = io->op == VD_IO_ZERO && !io->unmap ? FALLOC_FL_ZERO_RANGE
                                                          : FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
        }
        break;
    default:
        io->res = -EINVAL;
        return 1;
    }
    if (f->engine == VD_FILE_INLINE && io->sysop != VD_SYS_CALL) {
        io->res = vd_io_run(io);
        return 1;
    }
    io->threads = f->engine == VD_FILE_THREADS;
    io->punt = (uint8_t)f->punt;
    io->lim = &f->lim;
    vd_aio_submit(io->aio, io);
    return 0;
}

static void file_destroy(struct vd_store *s)
{
    struct file_store *f = (struct file_store *)s;
    close(f->fd);
    free(f);
}

static const struct vd_store_ops file_ops = {.start = file_start, .destroy = file_destroy};

vd_store *vd_file_store_new(const struct vd_file_params *p)
{
    struct file_store *f = calloc(1, sizeof(*f));
    if (!f)
        return NULL;
    vd_store_init(&f->s, &file_ops);
    f->fd = p->fd;
    f->engine = p->engine;
    f->punt = p->punt;
    f->is_blockdev = p->is_blockdev;
    f->lim.cap = POOL_SHARE;
    if (p->direct) {
        f->s.mem_align = p->dio_mem_align ? p->dio_mem_align : 1;
        f->s.len_align = p->dio_len_align ? p->dio_len_align : 1;
    }
    return &f->s;
}

int vd_file_probe(int fd, struct vd_file_info *out)
{
    struct statfs fs;
    struct statx sx;
    memset(out, 0, sizeof(*out));
    if (fstatfs(fd, &fs) == 0)
        out->fs_type = (int64_t)fs.f_type;
    if (statx(fd, "", AT_EMPTY_PATH, STATX_TYPE | STATX_DIOALIGN, &sx) == 0) {
        out->is_blockdev = S_ISBLK(sx.stx_mode);
        if (sx.stx_mask & STATX_DIOALIGN) {
            out->dio_mem_align = sx.stx_dio_mem_align;
            out->dio_offset_align = sx.stx_dio_offset_align;
        }
    }
    int ssz;
    if (out->is_blockdev && ioctl(fd, BLKSSZGET, &ssz) == 0 && ssz > 0)
        out->logical_block = (uint32_t)ssz;
    return 0;
}
