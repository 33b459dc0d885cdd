/* Small helpers over iovec arrays (guest buffers), shared by the devices. */
#ifndef VHOSTD_IOV_H
#define VHOSTD_IOV_H
#include <stdint.h>
#include <sys/uio.h>

/* Copy up to len bytes out of iov, starting skip bytes in; returns bytes copied. */
uint64_t vd_iov_read(const struct iovec *iov, int n, uint64_t skip, void *buf, uint64_t len);
/* Copy len bytes from src (after sskip) to dst (after dskip), piece to
 * piece with no bounce buffer; returns the bytes copied (less when either
 * side runs out). */
uint64_t vd_iov_copy(const struct iovec *dst, int ndst, uint64_t dskip, const struct iovec *src, int nsrc,
                     uint64_t sskip, uint64_t len);
/* Copy up to len bytes into iov, starting skip bytes in; returns bytes copied. */
uint64_t vd_iov_write(const struct iovec *iov, int n, uint64_t skip, const void *buf, uint64_t len);
/* Drop bytes from the front / back of an iovec array in place; return the new count. */
int vd_iov_skip_front(struct iovec **iov, int n, uint64_t skip);
int vd_iov_trim_back(struct iovec *iov, int n, uint64_t trim);
/* Pointer to byte `off` of the iovec data, or NULL past the end. */
uint8_t *vd_iov_byte(const struct iovec *iov, int n, uint64_t off);
#endif
