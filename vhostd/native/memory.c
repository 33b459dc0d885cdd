/* Guest memory table: regions mapped from the front-end's fds. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vd.h"

static int overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

int vd_mem_add(struct vd_mem *m, const struct vd_region_desc *d, int fd, char *err, size_t errlen)
{
    struct stat st;
    uint64_t end;

    if (d->size == 0) {
        snprintf(err, errlen, "region at gpa %#llx has size 0", (unsigned long long)d->gpa);
        return -EINVAL;
    }
    if (__builtin_add_overflow(d->gpa, d->size, &end) || __builtin_add_overflow(d->uva, d->size, &end) ||
        __builtin_add_overflow(d->mmap_offset, d->size, &end)) {
        snprintf(err, errlen, "region gpa %#llx size %#llx wraps the address space",
                 (unsigned long long)d->gpa, (unsigned long long)d->size);
        return -EINVAL;
    }
    if (m->n >= VD_MAX_REGIONS) {
        snprintf(err, errlen, "too many memory regions (limit %d)", VD_MAX_REGIONS);
        return -ENOSPC;
    }
    for (uint32_t i = 0; i < m->n; i++) {
        if (overlaps(d->gpa, d->size, m->r[i].gpa, m->r[i].size) ||
            overlaps(d->uva, d->size, m->r[i].uva, m->r[i].size)) {
            snprintf(err, errlen, "region gpa %#llx size %#llx overlaps region gpa %#llx size %#llx",
                     (unsigned long long)d->gpa, (unsigned long long)d->size,
                     (unsigned long long)m->r[i].gpa, (unsigned long long)m->r[i].size);
            return -EINVAL;
        }
    }
    if (fstat(fd, &st) < 0) {
        snprintf(err, errlen, "fstat of region fd failed: %s", strerror(errno));
        return -errno;
    }
    /* Mapping past the end of the file would SIGBUS on first touch. */
    if ((S_ISREG(st.st_mode) || st.st_size > 0) && (uint64_t)st.st_size < end) {
        snprintf(err, errlen, "region needs %#llx bytes of its fd but the file has only %#llx",
                 (unsigned long long)end, (unsigned long long)st.st_size);
        return -EINVAL;
    }
    long page = sysconf(_SC_PAGESIZE);
    uint64_t aligned = d->mmap_offset & ~(uint64_t)(page - 1);
    size_t len = d->size + (d->mmap_offset - aligned);
    void *map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, (off_t)aligned);
    if (map == MAP_FAILED) {
        int e = errno;
        snprintf(err, errlen,
                 "cannot map guest memory shared (%s): guest memory must be shareable "
                 "(QEMU: -object memory-backend-memfd,share=on)", strerror(e));
        return -e;
    }
    if (m->n == m->cap) {
        uint32_t cap = m->cap ? m->cap * 2 : 8;
        struct vd_region *r = realloc(m->r, cap * sizeof(*r));
        if (!r) {
            munmap(map, len);
            snprintf(err, errlen, "out of memory for the region table");
            return -ENOMEM;
        }
        m->r = r;
        m->cap = cap;
    }
    uint32_t pos = 0;
    while (pos < m->n && m->r[pos].gpa < d->gpa)
        pos++;
    memmove(&m->r[pos + 1], &m->r[pos], (m->n - pos) * sizeof(m->r[0]));
    m->r[pos] = (struct vd_region){
        .gpa = d->gpa, .size = d->size, .uva = d->uva,
        .host = (uint8_t *)map + (d->mmap_offset - aligned), .map = map, .map_len = len,
    };
    m->n++;
    return 0;
}

int vd_mem_remove(struct vd_mem *m, const struct vd_region_desc *d, char *err, size_t errlen)
{
    for (uint32_t i = 0; i < m->n; i++) {
        struct vd_region *r = &m->r[i];
        if (r->gpa == d->gpa && r->size == d->size && r->uva == d->uva) {
            munmap(r->map, r->map_len);
            memmove(r, r + 1, (m->n - i - 1) * sizeof(*r));
            m->n--;
            return 0;
        }
    }
    snprintf(err, errlen, "no region with gpa %#llx size %#llx uva %#llx to remove",
             (unsigned long long)d->gpa, (unsigned long long)d->size, (unsigned long long)d->uva);
    return -ENOENT;
}

void vd_mem_clear(struct vd_mem *m)
{
    for (uint32_t i = 0; i < m->n; i++)
        munmap(m->r[i].map, m->r[i].map_len);
    free(m->r);
    m->r = NULL;
    m->n = m->cap = 0;
}

/* Region containing gpa (binary search over the sorted table). */
static const struct vd_region *find_gpa(const struct vd_mem *m, uint64_t gpa)
{
    uint32_t lo = 0, hi = m->n;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        const struct vd_region *r = &m->r[mid];
        if (gpa < r->gpa)
            hi = mid;
        else if (gpa - r->gpa >= r->size)
            lo = mid + 1;
        else
            return r;
    }
    return NULL;
}

void *vd_mem_gpa(const struct vd_mem *m, uint64_t gpa, uint64_t len)
{
    const struct vd_region *r = find_gpa(m, gpa);
    if (!r || len > r->size - (gpa - r->gpa))
        return NULL;
    return r->host + (gpa - r->gpa);
}

void *vd_mem_uva(const struct vd_mem *m, uint64_t uva, uint64_t len)
{
    for (uint32_t i = 0; i < m->n; i++) {
        const struct vd_region *r = &m->r[i];
        if (uva >= r->uva && uva - r->uva < r->size) {
            if (len > r->size - (uva - r->uva))
                return NULL;
            return r->host + (uva - r->uva);
        }
    }
    return NULL;
}

int vd_mem_map(const struct vd_mem *m, uint64_t gpa, uint64_t len, struct iovec *iov, int max)
{
    int n = 0;
    while (len) {
        const struct vd_region *r = find_gpa(m, gpa);
        if (!r)
            return -1;
        if (n == max)
            return -2;
        uint64_t off = gpa - r->gpa;
        uint64_t chunk = r->size - off;
        if (chunk > len)
            chunk = len;
        iov[n].iov_base = r->host + off;
        iov[n].iov_len = chunk;
        n++;
        gpa += chunk; /* cannot wrap: chunk ends inside a region that does not wrap */
        len -= chunk;
    }
    return n;
}

int vd_mem_owns(const struct vd_mem *m, const void *host)
{
    const uint8_t *p = host;
    for (uint32_t i = 0; i < m->n; i++) {
        const uint8_t *base = m->r[i].map;
        if (base && p >= base && p < base + m->r[i].map_len)
            return 1;
    }
    return 0;
}
