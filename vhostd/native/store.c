/* What every store has: references, and lines for the daemon's log. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <time.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "api.h"
#include "store.h"

void vd_store_init(struct vd_store *s, const struct vd_store_ops *ops)
{
    memset(s, 0, sizeof(*s));
    s->ops = ops;
    s->refs = 1;
    s->mem_align = s->len_align = 1;
    s->event_fd = -1;
    pthread_mutex_init(&s->note_lock, NULL);
}

void vd_store_ref(vd_store *s)
{
    __atomic_add_fetch(&s->refs, 1, __ATOMIC_RELAXED);
}

void vd_store_unref(vd_store *s)
{
    if (s && __atomic_sub_fetch(&s->refs, 1, __ATOMIC_ACQ_REL) == 0)
        s->ops->destroy(s);
}

void vd_store_note(struct vd_store *s, int warning, const char *fmt, ...)
{
    va_list ap;
    pthread_mutex_lock(&s->note_lock);
    if (s->note_count == VD_STORE_NOTES) { /* the daemon lags: drop the oldest */
        s->note_first = (s->note_first + 1) % VD_STORE_NOTES;
        s->note_count--;
    }
    char *line = s->notes[(s->note_first + s->note_count) % VD_STORE_NOTES];
    line[0] = warning ? 'W' : 'I';
    va_start(ap, fmt);
    vsnprintf(line + 1, VD_STORE_NOTE_LEN - 1, fmt, ap);
    va_end(ap);
    s->note_count++;
    int fd = s->event_fd;
    pthread_mutex_unlock(&s->note_lock);
    uint64_t one = 1;
    if (fd >= 0 && write(fd, &one, sizeof(one)) < 0) {
    }
}

int vd_store_take_note(vd_store *s, char *buf, size_t len)
{
    pthread_mutex_lock(&s->note_lock);
    int got = s->note_count > 0;
    if (got) {
        snprintf(buf, len, "%s", s->notes[s->note_first]);
        s->note_first = (s->note_first + 1) % VD_STORE_NOTES;
        s->note_count--;
    }
    pthread_mutex_unlock(&s->note_lock);
    return got;
}

void vd_store_set_event_fd(vd_store *s, int fd)
{
    pthread_mutex_lock(&s->note_lock);
    s->event_fd = fd;
    pthread_mutex_unlock(&s->note_lock);
}

/* ---- closing off the workers and the event loop */

static pthread_mutex_t closing_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t closing_done = PTHREAD_COND_INITIALIZER;
static int closing;

struct closer {
    struct vd_store *s;
    void (*close)(struct vd_store *s);
};

static void *closer_main(void *arg)
{
    struct closer c = *(struct closer *)arg;
    free(arg);
    c.close(c.s);
    pthread_mutex_lock(&closing_lock);
    closing--;
    pthread_cond_broadcast(&closing_done);
    pthread_mutex_unlock(&closing_lock);
    return NULL;
}

void vd_store_close_later(struct vd_store *s, void (*close)(struct vd_store *s))
{
    struct closer *c = malloc(sizeof(*c));
    pthread_attr_t attr;
    pthread_t t;
    sigset_t all, old;
    if (c) {
        c->s = s;
        c->close = close;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old); /* the daemon's signals are not its business */
        pthread_mutex_lock(&closing_lock);
        int rc = pthread_create(&t, &attr, closer_main, c);
        if (rc == 0)
            closing++;
        pthread_mutex_unlock(&closing_lock);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        pthread_attr_destroy(&attr);
        if (rc == 0)
            return;
        free(c);
    }
    close(s); /* no thread to spare: here, then */
}

int vd_stores_settle(int timeout_ms)
{
    struct timespec end;
    clock_gettime(CLOCK_REALTIME, &end);
    end.tv_sec += timeout_ms / 1000;
    end.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
    if (end.tv_nsec >= 1000000000) {
        end.tv_sec++;
        end.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&closing_lock);
    while (closing > 0 && pthread_cond_timedwait(&closing_done, &closing_lock, &end) == 0)
        ;
    int left = closing;
    pthread_mutex_unlock(&closing_lock);
    return left;
}
