/* A disk's store: where its data lives (an image file or block device, an
 * NBD export, an RBD image).  The device (blk.c) hands it one block
 * operation at a time per request (struct vd_io, aio.h: read, write, flush,
 * discard, zero); the store starts it and reports the result through
 * io->done on the request's worker.  Stores know nothing of virtio or rings.
 */
#ifndef VHOSTD_STORE_H
#define VHOSTD_STORE_H

#include <pthread.h>
#include <stdint.h>

#include "aio.h"

struct vd_store;

struct vd_store_ops {
    /* Start io on the calling worker (io->aio is its I/O context).  Returns 1
     * when it finished at once (io->res holds the result), else 0 and
     * io->done(io, res) follows on that worker. */
    int (*start)(struct vd_store *s, struct vd_io *io);
    /* The last reference is gone (nothing of it is in flight): free it. */
    void (*destroy)(struct vd_store *s);
};

#define VD_STORE_NOTES 16
#define VD_STORE_NOTE_LEN 240

struct vd_store {
    const struct vd_store_ops *ops;
    int refs;
    /* What its buffers must look like; blk.c bounces the rest: */
    int contiguous;              /* reads and writes take a single buffer */
    uint32_t mem_align, len_align; /* address and length of each buffer (O_DIRECT); 1 = any */
    uint64_t max_len;            /* bytes one read or write may move (more: a short transfer); 0 = any */
    /* Lines for the daemon's log (a remote store's connection coming and
     * going, operations timing out); the control plane takes them when
     * event_fd becomes readable.  The oldest are dropped when it lags. */
    int event_fd;
    pthread_mutex_t note_lock;
    char notes[VD_STORE_NOTES][VD_STORE_NOTE_LEN];
    int note_first, note_count;
};

void vd_store_init(struct vd_store *s, const struct vd_store_ops *ops);
/* Run close(s) on a thread of its own (for a store whose closing may wait on
 * a server); vd_stores_settle (api.h) waits for those still running. */
void vd_store_close_later(struct vd_store *s, void (*close)(struct vd_store *s));
/* Say something to the daemon's log (any thread), as a warning or not.  The
 * line the daemon takes starts with 'W' or 'I'. */
void vd_store_note(struct vd_store *s, int warning, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
