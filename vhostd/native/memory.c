/* Guest memory table: regions mapped from the front-end's fds.
 *
 * A table is an immutable snapshot: a change builds a new table and the
 * device swaps it in.  Requests whose I/O is still in flight keep a
 * reference to the table they were mapped against, so the kernel never
 * reads or writes an address we have already unmapped (or, worse, mapped
 * again for something else).  Mappings are shared between the tables that
 * contain them and unmapped with the last one. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vd.h"

struct vd_mapping {
    int refs; /* atomic: tables holding it */
    void *map;
    size_t len;
};

static void mapping_put(struct vd_mapping *m)
{
    if (__atomic_sub_fetch(&m->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        munmap(m->map, m->len);
        free(m);
    }
}

static struct vd_mem *table_new(uint32_t n)
{
    struct vd_mem *t = calloc(1, sizeof(*t) + (size_t)n * sizeof(struct vd_region));
    if (t)
        t->refs = 1;
    return t;
}

/* A copy of `old` (NULL: empty) with room for `extra` more regions; the
 * copy holds its own reference to every mapping. */
static struct vd_mem *table_copy(const struct vd_mem *old, uint32_t extra)
{
    uint32_t n = old ? old->n : 0;
    struct vd_mem *t = table_new(n + extra);
    if (!t)
        return NULL;
    for (uint32_t i = 0; i < n; i++) {
        t->r[i] = old->r[i];
        __atomic_add_fetch(&t->r[i].m->refs, 1, __ATOMIC_RELAXED);
    }
    t->n = n;
    return t;
}

void vd_mem_get(struct vd_mem *t, int n)
{
    if (t && n)
        __atomic_add_fetch(&t->refs, n, __ATOMIC_RELAXED);
}

void vd_mem_put(struct vd_mem *t)
{
    if (!t || __atomic_sub_fetch(&t->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    for (uint32_t i = 0; i < t->n; i++)
        mapping_put(t->r[i].m);
    free(t);
}

static int overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

/* Check d against t, map fd and insert the region into t (which has room). */
static int table_insert(struct vd_mem *t, const struct vd_region_desc *d, int fd, char *err, size_t errlen)
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
    if (t->n >= VD_MAX_REGIONS) {
        snprintf(err, errlen, "too many memory regions (limit %d)", VD_MAX_REGIONS);
        return -ENOSPC;
    }
    for (uint32_t i = 0; i < t->n; i++) {
        if (overlaps(d->gpa, d->size, t->r[i].gpa, t->r[i].size) ||
            overlaps(d->uva, d->size, t->r[i].uva, t->r[i].size)) {
            snprintf(err, errlen, "region gpa %#llx size %#llx overlaps region gpa %#llx size %#llx",
                     (unsigned long long)d->gpa, (unsigned long long)d->size,
                     (unsigned long long)t->r[i].gpa, (unsigned long long)t->r[i].size);
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
    struct vd_mapping *m = malloc(sizeof(*m));
    if (!m) {
        snprintf(err, errlen, "out of memory for the region table");
        return -ENOMEM;
    }
    void *map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, (off_t)aligned);
    if (map == MAP_FAILED) {
        int e = errno;
        free(m);
        snprintf(err, errlen,
                 "cannot map guest memory shared (%s): guest memory must be shareable "
                 "(QEMU: -object memory-backend-memfd,share=on)", strerror(e));
        return -e;
    }
    *m = (struct vd_mapping){.refs = 1, .map = map, .len = len};
    uint32_t pos = 0;
    while (pos < t->n && t->r[pos].gpa < d->gpa)
        pos++;
    memmove(&t->r[pos + 1], &t->r[pos], (t->n - pos) * sizeof(t->r[0]));
    t->r[pos] = (struct vd_region){
        .gpa = d->gpa, .size = d->size, .uva = d->uva,
        .host = (uint8_t *)map + (d->mmap_offset - aligned), .m = m,
    };
    t->n++;
    return 0;
}

int vd_mem_build(struct vd_mem **out, int n, const struct vd_region_desc *d, const int *fds, char *err,
                 size_t errlen)
{
    struct vd_mem *t = table_new(n > 0 ? (uint32_t)n : 0);
    if (!t) {
        snprintf(err, errlen, "out of memory for the region table");
        return -ENOMEM;
    }
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++)
        rc = table_insert(t, &d[i], fds[i], err, errlen);
    if (rc) {
        vd_mem_put(t);
        return rc;
    }
    *out = t;
    return 0;
}

int vd_mem_with(struct vd_mem **out, const struct vd_mem *old, const struct vd_region_desc *d, int fd, char *err,
                size_t errlen)
{
    struct vd_mem *t = table_copy(old, 1);
    if (!t) {
        snprintf(err, errlen, "out of memory for the region table");
        return -ENOMEM;
    }
    int rc = table_insert(t, d, fd, err, errlen);
    if (rc) {
        vd_mem_put(t);
        return rc;
    }
    *out = t;
    return 0;
}

int vd_mem_without(struct vd_mem **out, const struct vd_mem *old, const struct vd_region_desc *d, char *err,
                   size_t errlen)
{
    for (uint32_t i = 0; old && i < old->n; i++) {
        const struct vd_region *r = &old->r[i];
        if (r->gpa == d->gpa && r->size == d->size && r->uva == d->uva) {
            struct vd_mem *t = table_copy(old, 0);
            if (!t) {
                snprintf(err, errlen, "out of memory for the region table");
                return -ENOMEM;
            }
            mapping_put(t->r[i].m);
            memmove(&t->r[i], &t->r[i + 1], (t->n - i - 1) * sizeof(t->r[0]));
            t->n--;
            *out = t;
            return 0;
        }
    }
    snprintf(err, errlen, "no region with gpa %#llx size %#llx uva %#llx to remove",
             (unsigned long long)d->gpa, (unsigned long long)d->size, (unsigned long long)d->uva);
    return -ENOENT;
}

/* Region containing gpa (binary search over the sorted table). */
static const struct vd_region *find_gpa(const struct vd_mem *m, uint64_t gpa)
{
    uint32_t lo = 0, hi = m ? m->n : 0;
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
    for (uint32_t i = 0; m && i < m->n; i++) {
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
    for (uint32_t i = 0; m && i < m->n; i++) {
        const uint8_t *base = m->r[i].m->map;
        if (p >= base && p < base + m->r[i].m->len)
            return 1;
    }
    return 0;
}

int vd_mem_host_gpa(const struct vd_mem *m, const void *host, uint64_t *gpa)
{
    const uint8_t *p = host;
    for (uint32_t i = 0; m && i < m->n; i++) {
        const struct vd_region *r = &m->r[i];
        if (p >= r->host && (uint64_t)(p - r->host) < r->size) {
            *gpa = r->gpa + (uint64_t)(p - r->host);
            return 0;
        }
    }
    return -1;
}

uint64_t vd_mem_end(const struct vd_mem *m)
{
    /* sorted by gpa, non-overlapping: the last region ends highest */
    return m && m->n ? m->r[m->n - 1].gpa + m->r[m->n - 1].size : 0;
}
