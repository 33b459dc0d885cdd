/* Freestanding runtime: printing, memory, allocator, clock, cmdline, PRNG. */
#include "rt.h"

struct boot_info *g_boot;
u64 g_tsc_khz;
const char *g_tsc_source = "none";

static u64 heap_cur, heap_end;

/* ------------------------------------------------------------ exit, panic */

NORETURN void exit(int status)
{
    for (;;)
        outl(EXIT_PORT, (u32)status); /* the VMM ends the VM here */
}

NORETURN void panic(const char *fmt, ...)
{
    va_list ap;
    uart_puts("PANIC: ");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    uart_putc('\n');
    exit(99);
}

/* ------------------------------------------------------------ UART */

void uart_putc(char c)
{
    outb(UART_PORT, (u8)c);
}

void uart_puts(const char *s)
{
    while (*s)
        uart_putc(*s++);
}

/* Formatting goes through a sink: the UART or a bounded buffer. */
struct sink {
    char *buf; /* NULL: UART */
    size_t cap, len;
};

static void sink_put(struct sink *k, char c)
{
    if (!k->buf)
        uart_putc(c);
    else if (k->len + 1 < k->cap)
        k->buf[k->len] = c;
    k->len++;
}

static void fmt_num(struct sink *k, u64 v, unsigned base, int upper, int neg, int width, int zero, int left)
{
    char tmp[24];
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    int n = 0;
    do {
        tmp[n++] = digits[v % base];
        v /= base;
    } while (v);
    int len = n + (neg ? 1 : 0);
    int pad = width > len ? width - len : 0;
    if (!left && !zero)
        for (; pad > 0; pad--)
            sink_put(k, ' ');
    if (neg)
        sink_put(k, '-');
    if (!left && zero)
        for (; pad > 0; pad--)
            sink_put(k, '0');
    while (n)
        sink_put(k, tmp[--n]);
    for (; pad > 0; pad--)
        sink_put(k, ' ');
}

static void do_format(struct sink *k, const char *f, va_list ap)
{
    for (; *f; f++) {
        if (*f != '%') {
            sink_put(k, *f);
            continue;
        }
        f++;
        int zero = 0, left = 0, width = 0, lng = 0;
        for (;; f++) {
            if (*f == '0')
                zero = 1;
            else if (*f == '-')
                left = 1;
            else
                break;
        }
        while (*f >= '0' && *f <= '9')
            width = width * 10 + (*f++ - '0');
        for (;; f++) {
            if (*f == 'l' || *f == 'z')
                lng = 1;
            else if (*f != 'h')
                break;
        }
        switch (*f) {
        case 'd':
        case 'i': {
            s64 v = lng ? va_arg(ap, s64) : va_arg(ap, int);
            u64 mag = v < 0 ? (u64)0 - (u64)v : (u64)v;
            fmt_num(k, mag, 10, 0, v < 0, width, zero, left);
            break;
        }
        case 'u':
            fmt_num(k, lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 10, 0, 0, width, zero, left);
            break;
        case 'x':
        case 'X':
            fmt_num(k, lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 16, *f == 'X', 0, width, zero, left);
            break;
        case 'p':
            sink_put(k, '0');
            sink_put(k, 'x');
            fmt_num(k, (u64)(uintptr_t)va_arg(ap, void *), 16, 0, 0, width, zero, left);
            break;
        case 'c':
            sink_put(k, (char)va_arg(ap, int));
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            int len = (int)strlen(s);
            if (!left)
                for (int i = len; i < width; i++)
                    sink_put(k, ' ');
            while (*s)
                sink_put(k, *s++);
            if (left)
                for (int i = len; i < width; i++)
                    sink_put(k, ' ');
            break;
        }
        case '%':
            sink_put(k, '%');
            break;
        case '\0':
            return;
        default:
            sink_put(k, '%');
            sink_put(k, *f);
            break;
        }
    }
}

int vprintf(const char *fmt, va_list ap)
{
    struct sink k = {0, 0, 0};
    do_format(&k, fmt, ap);
    return (int)k.len;
}

int printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}

int fail_line(const char *prefix, const char *fmt, ...)
{
    va_list ap;
    uart_puts(prefix);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    uart_putc('\n');
    return 1;
}

int vsnprintf(char *buf, size_t n, const char *fmt, va_list ap)
{
    struct sink k = {buf, n, 0};
    do_format(&k, fmt, ap);
    if (n)
        buf[k.len < n ? k.len : n - 1] = '\0';
    return (int)k.len;
}

int snprintf(char *buf, size_t n, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = vsnprintf(buf, n, fmt, ap);
    va_end(ap);
    return r;
}

void print_dec(u64 v)
{
    printf("%lu", v);
}

void print_hex(u64 v)
{
    printf("0x%lx", v);
}

/* ------------------------------------------------------------ memory */

#ifndef GUEST_HOSTED
/* gcc may emit calls to these.  Written with string instructions so that
 * the compiler cannot turn the loops back into calls to themselves. */
void *memset(void *d, int c, size_t n)
{
    void *p = d;
    __asm__ __volatile__("rep stosb" : "+D"(p), "+c"(n) : "a"(c) : "memory");
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    void *p = d;
    __asm__ __volatile__("rep movsb" : "+D"(p), "+S"(s), "+c"(n) : : "memory");
    return d;
}

void *memmove(void *d, const void *s, size_t n)
{
    if ((uintptr_t)d <= (uintptr_t)s || (uintptr_t)d >= (uintptr_t)s + n)
        return memcpy(d, s, n);
    /* overlapping with d above s: copy backwards */
    u8 *dp = (u8 *)d + n - 1;
    const u8 *sp = (const u8 *)s + n - 1;
    __asm__ __volatile__("std; rep movsb; cld" : "+D"(dp), "+S"(sp), "+c"(n) : : "memory");
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    /* word at a time while equal, then bytes */
    while (n >= 8) {
        u64 p, q;
        __builtin_memcpy(&p, x, 8);
        __builtin_memcpy(&q, y, 8);
        if (p != q)
            break;
        x += 8;
        y += 8;
        n -= 8;
    }
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x < *y ? -1 : 1;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return (u8)*a - (u8)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b)
            return (u8)*a - (u8)*b;
        if (!*a)
            return 0;
    }
    return 0;
}
#endif

void *alloc(u64 size, u64 align)
{
    if (align < 8)
        align = 8;
    u64 p = ALIGN_UP(heap_cur, align);
    if (p < heap_cur || p > heap_end || size > heap_end - p)
        panic("out of memory: %lu bytes wanted, %lu left", size, alloc_remaining());
    heap_cur = p + size;
    return (void *)(uintptr_t)p;
}

void *zalloc(u64 size, u64 align)
{
    void *p = alloc(size, align);
    memset(p, 0, size);
    return p;
}

u64 alloc_remaining(void)
{
    return heap_end > heap_cur ? heap_end - heap_cur : 0;
}

/* ------------------------------------------------------------ cmdline */

const char *cmdline(void)
{
    return g_boot ? g_boot->cmdline : "";
}

int cmd_get(const char *key, char *buf, size_t n)
{
    const char *s = cmdline();
    size_t klen = strlen(key);
    const char *end = s + sizeof(g_boot->cmdline);
    while (s < end && *s) {
        while (s < end && *s == ' ')
            s++;
        const char *w = s;
        while (s < end && *s && *s != ' ')
            s++;
        size_t wlen = (size_t)(s - w);
        if (wlen >= klen && strncmp(w, key, klen) == 0 && (wlen == klen || w[klen] == '=')) {
            const char *v = wlen == klen ? "1" : w + klen + 1;
            size_t vlen = wlen == klen ? 1 : wlen - klen - 1;
            if (n) {
                if (vlen >= n)
                    vlen = n - 1;
                memcpy(buf, v, vlen);
                buf[vlen] = '\0';
            }
            return 1;
        }
    }
    return 0;
}

u64 parse_u64(const char *s, int *ok)
{
    u64 v = 0;
    int base = 10, digits = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    for (;; s++) {
        int d;
        if (*s >= '0' && *s <= '9')
            d = *s - '0';
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = *s - 'a' + 10;
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = *s - 'A' + 10;
        else
            break;
        v = v * (u64)base + (u64)d;
        digits++;
    }
    if (base == 10 && digits) {
        if (*s == 'k' || *s == 'K')
            v <<= 10, s++;
        else if (*s == 'm' || *s == 'M')
            v <<= 20, s++;
        else if (*s == 'g' || *s == 'G')
            v <<= 30, s++;
    }
    if (ok)
        *ok = digits > 0 && *s == '\0';
    return v;
}

u64 cmd_u64(const char *key, u64 dflt)
{
    char buf[32];
    int ok;
    if (!cmd_get(key, buf, sizeof(buf)))
        return dflt;
    u64 v = parse_u64(buf, &ok);
    if (!ok)
        panic("cmdline: %s=%s is not a number", key, buf);
    return v;
}

int cmd_is(const char *key, const char *value, int dflt)
{
    char buf[64];
    if (!cmd_get(key, buf, sizeof(buf)))
        return dflt;
    return strcmp(buf, value) == 0;
}

/* ------------------------------------------------------------ PRNG */

u64 mix64(u64 x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

void rng_seed(struct rng *r, u64 seed)
{
    r->s = mix64(seed + 0x9e3779b97f4a7c15ull);
    if (!r->s)
        r->s = 1;
}

u64 rng_next(struct rng *r)
{
    u64 x = r->s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    r->s = x;
    return x * 0x2545f4914f6cdd1dull;
}

u64 rng_below(struct rng *r, u64 n)
{
    return n ? rng_next(r) % n : 0;
}

/* ------------------------------------------------------------ clock */

void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
#ifdef GUEST_HOSTED
    (void)leaf, (void)sub;
    *a = *b = *c = *d = 0;
#else
    __asm__ __volatile__("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
#endif
}

u64 tsc_khz_or_assumed(void)
{
    return g_tsc_khz ? g_tsc_khz : ASSUMED_TSC_KHZ;
}

u64 cycles_to_us(u64 cycles)
{
    u64 khz = tsc_khz_or_assumed();
    /* cycles * 1000 / khz without overflow for any realistic span */
    if (cycles < (~0ull / 1000))
        return cycles * 1000 / khz;
    return cycles / khz * 1000;
}

u64 us_to_cycles(u64 us)
{
    return us * tsc_khz_or_assumed() / 1000;
}

u64 rate_per_sec(u64 count, u64 cycles)
{
    if (!g_tsc_khz || !cycles)
        return 0;
    /* count * khz * 1000 / cycles, kept in range: count and khz are each < 2^40 here */
    u64 num = count * g_tsc_khz;
    if (count && num / count != g_tsc_khz)
        return count / (cycles / g_tsc_khz) * 1000;
    if (num < ~0ull / 1000)
        return num * 1000 / cycles;
    return num / cycles * 1000;
}

/* The PIT (i8254) counts at 1.193182 MHz.  Channel 0 is put in mode 2 with
 * the full 65536 count and read back with latch commands while the TSC runs
 * for ~50 ms of PIT ticks.  (Interrupts are off, so IRQ0 is harmless.)
 * Needs a PIT that answers ports 0x40/0x43, e.g. KVM's in-kernel one
 * (KVM_CREATE_PIT2): only used when the cmdline says pit=1. */
#define PIT_HZ 1193182ull
static u16 pit_read0(void)
{
    outb(0x43, 0x00); /* latch channel 0 */
    u8 lo = inb(0x40);
    u8 hi = inb(0x40);
    return (u16)(lo | hi << 8);
}

static u64 pit_calibrate(void)
{
    const u64 target = PIT_HZ / 20; /* 50 ms */
    outb(0x43, 0x34);                /* channel 0, lobyte/hibyte, mode 2, binary */
    outb(0x40, 0);
    outb(0x40, 0); /* 0 = 65536 */
    u16 prev = pit_read0();
    u64 t0 = rdtsc(), ticks = 0;
    u32 reads = 0, moved = 0;
    while (ticks < target) {
        u16 cur = pit_read0();
        u16 delta = (u16)(prev - cur); /* counts down, wraps at 65536 */
        ticks += delta;
        moved += delta != 0;
        prev = cur;
        if (++reads >= 2000 && moved < 10)
            return 0; /* the counter does not move: no PIT there */
        if (reads > 10000000)
            return 0;
    }
    u64 cycles = rdtsc() - t0;
    u64 khz = cycles * PIT_HZ / ticks / 1000; /* cycles < 2^40 here: no overflow */
    return khz >= 100000 ? khz : 0; /* below 100 MHz: not believable */
}

static void clock_init(void)
{
    u32 a, b, c, d;
    u64 v = cmd_u64("tsc_khz", 0);
    if (v) {
        g_tsc_khz = v;
        g_tsc_source = "cmdline";
        return;
    }
    cpuid(0x40000000, 0, &a, &b, &c, &d);
    if (a >= 0x40000010 && a < 0x40000100) {
        cpuid(0x40000010, 0, &a, &b, &c, &d);
        if (a) {
            g_tsc_khz = a;
            g_tsc_source = "cpuid-hv";
            return;
        }
    }
    cpuid(0, 0, &a, &b, &c, &d);
    u32 max = a;
    if (max >= 0x15) {
        cpuid(0x15, 0, &a, &b, &c, &d);
        if (a && b && c) {
            g_tsc_khz = (u64)c * b / a / 1000;
            g_tsc_source = "cpuid-15";
            return;
        }
    }
    if (max >= 0x16) {
        cpuid(0x16, 0, &a, &b, &c, &d);
        if (a & 0xffff) {
            g_tsc_khz = (u64)(a & 0xffff) * 1000;
            g_tsc_source = "cpuid-16";
            return;
        }
    }
    if (cmd_is("pit", "1", 0)) {
        g_tsc_khz = pit_calibrate();
        if (g_tsc_khz) {
            g_tsc_source = "pit";
            return;
        }
    }
}

/* ------------------------------------------------------------ init */

void rt_init(struct boot_info *bi)
{
    if (!bi || bi->magic != VHOSTD_BOOT_MAGIC) {
        uart_puts("rt: bad boot info magic\n");
        exit(98);
    }
    if (bi->version != 1)
        printf("rt: boot info version %u (expected 1), continuing\n", bi->version);
    g_boot = bi;
    bi->cmdline[sizeof(bi->cmdline) - 1] = '\0';
    if (bi->num_devices > BOOT_MAX_DEVICES) {
        printf("rt: num_devices %u > %u, clamped\n", bi->num_devices, BOOT_MAX_DEVICES);
        bi->num_devices = BOOT_MAX_DEVICES;
    }
    heap_cur = bi->free_start;
    heap_end = bi->free_end < bi->memory || !bi->memory ? bi->free_end : bi->memory;
    if (heap_end < heap_cur)
        heap_end = heap_cur;
    clock_init();
}
