#include <string.h>

#include "iov.h"

uint64_t vd_iov_read(const struct iovec *iov, int n, uint64_t skip, void *buf, uint64_t len)
{
    uint64_t done = 0;
    for (int i = 0; i < n && done < len; i++) {
        if (skip >= iov[i].iov_len) {
            skip -= iov[i].iov_len;
            continue;
        }
        uint64_t chunk = iov[i].iov_len - skip;
        if (chunk > len - done)
            chunk = len - done;
        memcpy((uint8_t *)buf + done, (uint8_t *)iov[i].iov_base + skip, chunk);
        done += chunk;
        skip = 0;
    }
    return done;
}

uint64_t vd_iov_copy(const struct iovec *dst, int ndst, uint64_t dskip, const struct iovec *src, int nsrc,
                     uint64_t sskip, uint64_t len)
{
    int d = 0, s = 0;
    /* find the starting pieces */
    while (d < ndst && dskip >= dst[d].iov_len)
        dskip -= dst[d++].iov_len;
    while (s < nsrc && sskip >= src[s].iov_len)
        sskip -= src[s++].iov_len;
    uint64_t done = 0;
    while (done < len && d < ndst && s < nsrc) {
        uint64_t chunk = len - done;
        if (chunk > dst[d].iov_len - dskip)
            chunk = dst[d].iov_len - dskip;
        if (chunk > src[s].iov_len - sskip)
            chunk = src[s].iov_len - sskip;
        memcpy((uint8_t *)dst[d].iov_base + dskip, (const uint8_t *)src[s].iov_base + sskip, chunk);
        done += chunk;
        if ((dskip += chunk) == dst[d].iov_len) {
            d++;
            dskip = 0;
        }
        if ((sskip += chunk) == src[s].iov_len) {
            s++;
            sskip = 0;
        }
    }
    return done;
}

uint64_t vd_iov_write(const struct iovec *iov, int n, uint64_t skip, const void *buf, uint64_t len)
{
    uint64_t done = 0;
    for (int i = 0; i < n && done < len; i++) {
        if (skip >= iov[i].iov_len) {
            skip -= iov[i].iov_len;
            continue;
        }
        uint64_t chunk = iov[i].iov_len - skip;
        if (chunk > len - done)
            chunk = len - done;
        memcpy((uint8_t *)iov[i].iov_base + skip, (const uint8_t *)buf + done, chunk);
        done += chunk;
        skip = 0;
    }
    return done;
}

int vd_iov_skip_front(struct iovec **iov, int n, uint64_t skip)
{
    while (n && skip >= (*iov)->iov_len) {
        skip -= (*iov)->iov_len;
        (*iov)++;
        n--;
    }
    if (n && skip) {
        (*iov)->iov_base = (uint8_t *)(*iov)->iov_base + skip;
        (*iov)->iov_len -= skip;
    }
    return n;
}

int vd_iov_trim_back(struct iovec *iov, int n, uint64_t trim)
{
    while (n && trim >= iov[n - 1].iov_len) {
        trim -= iov[n - 1].iov_len;
        n--;
    }
    if (n && trim)
        iov[n - 1].iov_len -= trim;
    return n;
}

uint8_t *vd_iov_byte(const struct iovec *iov, int n, uint64_t off)
{
    for (int i = 0; i < n; i++) {
        if (off < iov[i].iov_len)
            return (uint8_t *)iov[i].iov_base + off;
        off -= iov[i].iov_len;
    }
    return NULL;
}
