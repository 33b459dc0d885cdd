/* The test frames selftest and netbench send: Ethernet, ethertype 0x88b5
 * (IEEE 802 local experimental), a small header, a payload that is a pure
 * function of (nonce, seq, offset), and a checksum over the whole frame.
 * A receiver can therefore check any frame byte for byte knowing only what
 * is in its header. */
#ifndef GUEST_NETPROTO_H
#define GUEST_NETPROTO_H

#include "rt.h"

#define NP_ETHERTYPE 0x88b5
#define NP_MAGIC 0x54474856u /* "VHGT" little endian */
#define NP_DATA 1
#define NP_CTRL 2
#define NP_MIN_FRAME 60
#define NP_MAX_FRAME 1514
#define NP_HDR_OFF 14

struct np_hdr {
    u32 magic;
    u8 kind;
    u8 flags;
    u16 len;      /* whole frame length */
    u32 seq;
    u32 nonce;    /* the sender's run nonce */
    u32 acked;    /* CTRL: DATA frames received in order from the peer so far */
    u32 csum;     /* np_csum of the frame with this field zero */
} __attribute__((packed));
_Static_assert(sizeof(struct np_hdr) == 24, "np_hdr layout");

extern const u8 NP_BROADCAST[6];

/* Frame length of DATA frame `seq` from the sender with `nonce`: a fixed
 * list of edge sizes first, then pseudo-random sizes in [60, 1514]. */
u32 np_data_len(u32 nonce, u32 seq);
/* Build a frame of `len` bytes into buf.  The payload of a DATA frame is
 * the (nonce, seq) pattern when fill=1, zeroes when fill=0 (cheaper);
 * CTRL frames always carry zeroes.  Receivers check with the same fill. */
void np_build(u8 *buf, u32 len, const u8 dst[6], const u8 src[6], u8 kind, u32 seq, u32 nonce, u32 acked, int fill);
/* Check a received frame: ethertype, magic, length, checksum and (fill)
 * every payload byte.  Fills *h.  Returns 0 or a static reason string. */
const char *np_check(const u8 *buf, u32 len, struct np_hdr *h, int fill);
u32 np_csum(const u8 *buf, u32 len);
int np_is_ours(const u8 *buf, u32 len); /* ethertype + magic */

#endif
