/* What every store has: references, and lines for the daemon's log. */
#define _GNU_SOURCE
#include <stdarg.h>
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
