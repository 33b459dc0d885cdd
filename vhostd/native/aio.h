/* Asynchronous I/O for device back-ends: what a device submits and how it
 * learns the result.  Knows nothing of rings or virtio.
 *
 * Two engines:
 *   io_uring  one ring per worker thread; an I/O is submitted at once, or,
 *             while the worker is busy, with the others of its round;
 *             completions are reaped by the worker (its eventfd is in the
 *             worker's epoll, and the ring is peeked while the worker is busy)
 *   threads   a pool shared by all workers (like QEMU's aio=threads): the
 *             fallback where io_uring is unavailable, and the home of
 *             operations io_uring lacks (block-device ioctls).  Each owner
 *             (a device) may occupy only a few threads at once, so a hung
 *             disk cannot take the pool from the others.
 * Either way a completion is handed back to the worker that submitted the
 * operation, so a device's completions run where its queue lives. */
#ifndef VHOSTD_AIO_H
#define VHOSTD_AIO_H

#include <pthread.h>
#include <stdint.h>
#include <sys/uio.h>

/* A block operation: what a device asks of its store (store.h). */
enum vd_io_op { VD_IO_READ, VD_IO_WRITE, VD_IO_FLUSH, VD_IO_DISCARD, VD_IO_ZERO };
/* What the file engines here run for it (the file store translates). */
enum vd_sys_op { VD_SYS_READV, VD_SYS_WRITEV, VD_SYS_FDATASYNC, VD_SYS_FALLOCATE, VD_SYS_CALL };

struct vd_io;
struct vd_req;

/* How many operations of one owner the thread pool runs at once. */
struct vd_iolimit {
    int active, cap;
    struct vd_io *head, *tail; /* waiting for one of the owner's slots */
};

struct vd_io {
    /* the block operation, set by the device */
    uint8_t op;           /* enum vd_io_op */
    uint8_t unmap;        /* VD_IO_ZERO: the store may deallocate (a hole reads back as zeroes) */
    const struct iovec *iov; /* READ/WRITE: the buffers */
    int niov;
    uint64_t off, len;    /* bytes; len for DISCARD/ZERO */
    /* how a file store runs it (file.c) */
    uint8_t sysop;        /* enum vd_sys_op */
    uint8_t threads;      /* run on the thread pool even if io_uring is there */
    uint8_t punt;         /* io_uring: never try it inline (IOSQE_ASYNC); for files
                             whose submission could wait (FUSE, network file systems) */
    int fd;
    int mode;                             /* fallocate mode */
    int64_t (*call)(struct vd_io *io);    /* VD_SYS_CALL: run on a pool thread, returns res */
    struct vd_iolimit *lim;               /* the owner's share of the thread pool */
    /* the completion: done(io, res) on the worker of aio; res is what the
     * operation returned (bytes moved, 0) or -errno */
    void (*done)(struct vd_io *io, int64_t res);
    struct vd_req *req;                   /* opaque to this layer */
    struct vd_aio *aio;                   /* that worker's I/O context, set by the device */
    /* a store's own, while the operation is with it (nbd.c) */
    uint64_t since;                       /* when the store was given it */
    uint64_t moved;                       /* bytes the issued read or write moves */
    void *conn;                           /* where it was issued */
    struct vd_io *s_prev, *s_next;
    /* the engine's */
    int64_t res;
    struct vd_io *next;
};

struct vd_threads;

/* One worker's submission and completion context. */
struct vd_aio {
    int efd;                  /* readable when completions wait */
    int has_uring;
    void *uring;              /* struct io_uring *, only in aio.c */
    unsigned unsubmitted;     /* SQEs prepared since the last flush */
    int hold;                 /* the worker is busy: submit at its flushes only (bigger batches) */
    struct vd_threads *pool;
    pthread_mutex_t lock;     /* the pool's deliveries */
    struct vd_io *done_head, *done_tail;
    struct vd_io *local_head, *local_tail; /* deliveries by this worker itself */
};

struct vd_threads *vd_threads_new(int max_threads);
void vd_threads_free(struct vd_threads *t);

/* Called on the worker thread that will use it.  Without io_uring (why says
 * so) everything goes to the pool. */
int vd_aio_init(struct vd_aio *a, struct vd_threads *pool, int want_uring, char *why, size_t whylen);
void vd_aio_destroy(struct vd_aio *a);
/* Queue a file operation (sysop, fd, ...); never blocks.  io_uring operations go
 * to the kernel at once, or at the next flush while hold is set. */
void vd_aio_submit(struct vd_aio *a, struct vd_io *io);
/* Hand what was queued to the kernel.  Returns 1 if some of it must be
 * tried again soon (the kernel was busy), else 0. */
int vd_aio_flush(struct vd_aio *a);
/* Call cb for each finished operation; returns how many. */
int vd_aio_reap(struct vd_aio *a, void (*cb)(struct vd_io *io, int64_t res, void *arg), void *arg);
/* Signals are Python's (its handlers run on the main thread): every native
 * thread blocks them but the synchronous faults. */
void vd_block_signals(void);
/* Run a file operation (sysop) here and now, on this thread; returns what done would get. */
int64_t vd_io_run(struct vd_io *io);
/* From any thread: io finished with res; done runs on io->aio's worker soon. */
void vd_aio_deliver(struct vd_io *io, int64_t res);
/* The same from io->aio's own worker (e.g. a store's callback there): no
 * lock, no wake-up; the worker reaps it in this round. */
void vd_aio_deliver_local(struct vd_io *io, int64_t res);

#endif
