/* Test frames: build and check (see netproto.h). */
#include "netproto.h"

const u8 NP_BROADCAST[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

static const u16 edge_sizes[] = {60, 61, 64, 100, 127, 128, 129, 256, 511, 512, 1000,
                                 1023, 1024, 1025, 1400, 1499, 1500, 1513, 1514};

u32 np_data_len(u32 nonce, u32 seq)
{
    if (seq < ARRAY_SIZE(edge_sizes))
        return edge_sizes[seq];
    return NP_MIN_FRAME + (u32)(mix64(((u64)nonce << 32) | seq) % (NP_MAX_FRAME - NP_MIN_FRAME + 1));
}

/* 32-bit Fletcher-like sum over 16-bit little-endian words (position
 * dependent, so swapped or shifted bytes are caught) */
u32 np_csum(const u8 *buf, u32 len)
{
    /* sums reduced once at the end: a < 2^27 and b < 2^37 for 1514 bytes */
    u64 a = 0xffff, b = 0xffff;
    for (u32 i = 0; i < len; i += 2) {
        a += buf[i] | (i + 1 < len ? (u32)buf[i + 1] << 8 : 0);
        b += a;
    }
    return (u32)(b % 65535) << 16 | (u32)(a % 65535);
}

static void fill_payload(u8 *p, u32 from, u32 to, u32 nonce, u32 seq)
{
    u64 s = mix64(((u64)nonce << 32) ^ seq ^ 0x5a5a000000000000ull);
    for (u32 i = from; i < to; i++) {
        if (((i - from) & 7) == 0)
            s = mix64(s + i);
        p[i] = (u8)(s >> ((i - from) & 7) * 8);
    }
}

void np_build(u8 *buf, u32 len, const u8 dst[6], const u8 src[6], u8 kind, u32 seq, u32 nonce, u32 acked, int fill)
{
    memcpy(buf, dst, 6);
    memcpy(buf + 6, src, 6);
    buf[12] = NP_ETHERTYPE >> 8;
    buf[13] = NP_ETHERTYPE & 0xff;
    struct np_hdr h = {NP_MAGIC, kind, 0, (u16)len, seq, nonce, acked, 0};
    memcpy(buf + NP_HDR_OFF, &h, sizeof(h));
    u32 start = NP_HDR_OFF + sizeof(h);
    if (fill && kind == NP_DATA)
        fill_payload(buf, start, len, nonce, seq);
    else
        memset(buf + start, 0, len - start);
    h.csum = np_csum(buf, len);
    memcpy(buf + NP_HDR_OFF + offsetof(struct np_hdr, csum), &h.csum, 4);
}

int np_is_ours(const u8 *buf, u32 len)
{
    u32 magic;
    if (len < NP_HDR_OFF + sizeof(struct np_hdr))
        return 0;
    memcpy(&magic, buf + NP_HDR_OFF, 4);
    return buf[12] == (NP_ETHERTYPE >> 8) && buf[13] == (NP_ETHERTYPE & 0xff) && magic == NP_MAGIC;
}

const char *np_check(const u8 *buf, u32 len, struct np_hdr *h, int fill)
{
    if (!np_is_ours(buf, len))
        return "not a test frame (ethertype/magic)";
    memcpy(h, buf + NP_HDR_OFF, sizeof(*h));
    if (h->len != len)
        return "length differs from the length the sender wrote";
    /* the checksum with its own field zeroed: fold the field back out */
    u8 tmp[NP_MAX_FRAME];
    if (len > sizeof(tmp))
        return "frame too long";
    memcpy(tmp, buf, len);
    memset(tmp + NP_HDR_OFF + offsetof(struct np_hdr, csum), 0, 4);
    if (np_csum(tmp, len) != h->csum)
        return "checksum mismatch";
    u32 start = NP_HDR_OFF + sizeof(*h);
    if (fill && h->kind == NP_DATA)
        fill_payload(tmp, start, len, h->nonce, h->seq);
    else
        memset(tmp + start, 0, len - start);
    if (memcmp(tmp + start, buf + start, len - start) != 0)
        return "payload bytes differ from the pattern";
    return 0;
}
