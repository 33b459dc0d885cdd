/* Freestanding runtime of the guest-drivers programs (see ../ABI.md).
 *
 * Port I/O, UART printing, mem* functions, a bump allocator over the free RAM
 * the boot info describes, a TSC clock, a PRNG, cmdline parsing and exit().
 * Built twice: for the guest (default) and, with GUEST_HOSTED defined, as
 * part of a Linux test program where port and MMIO accesses go to a fake
 * machine (tests/hosted.c).
 */
#ifndef GUEST_RT_H
#define GUEST_RT_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t s64;

/* ---- boot info (ABI.md) ---- */
#define VHOSTD_BOOT_MAGIC 0x564844424F4F5431ull
#define BOOT_MAX_DEVICES 16
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLK 2

struct boot_device {
    u64 mmio_base;
    u32 device_id;
    u32 irq;
};

struct boot_info {
    u64 magic;
    u32 version;
    u32 num_devices;
    u64 memory;
    u64 free_start;
    u64 free_end;
    char cmdline[256];
    struct boot_device devices[BOOT_MAX_DEVICES];
};

_Static_assert(sizeof(struct boot_device) == 16, "boot_device layout");
_Static_assert(offsetof(struct boot_info, cmdline) == 40, "boot_info layout");
_Static_assert(offsetof(struct boot_info, devices) == 296, "boot_info layout");

#define UART_PORT 0x3f8
#define EXIT_PORT 0x501

/* ---- compiler helpers and barriers ---- */
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define ALIGN_UP(x, a) (((x) + ((a) - 1)) & ~((u64)(a) - 1))
#define NORETURN __attribute__((noreturn))
#define PRINTF_LIKE(f, a) __attribute__((format(__printf__, f, a)))
#define barrier() __asm__ __volatile__("" ::: "memory")
/* x86 is TSO: stores are not reordered with stores, loads not with loads,
 * so the ring's write/read barriers only have to stop the compiler.  A store
 * followed by a load of another location can be reordered: full fence. */
#define wmb() barrier()
#define rmb() barrier()
#define mb() __asm__ __volatile__("lock; addl $0,(%%rsp)" ::: "memory", "cc")
#define READ_ONCE(x) (*(const volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

/* ---- port I/O and MMIO ---- */
#ifdef GUEST_HOSTED
void hosted_outb(u16 port, u8 v);
void hosted_outl(u16 port, u32 v);
u8 hosted_inb(u16 port);
u32 hosted_mmio_read(u64 addr, int size);
void hosted_mmio_write(u64 addr, int size, u32 v);
static inline void outb(u16 port, u8 v) { hosted_outb(port, v); }
static inline void outl(u16 port, u32 v) { hosted_outl(port, v); }
static inline u8 inb(u16 port) { return hosted_inb(port); }
static inline u8 mmio_read8(u64 a) { return (u8)hosted_mmio_read(a, 1); }
static inline u16 mmio_read16(u64 a) { return (u16)hosted_mmio_read(a, 2); }
static inline u32 mmio_read32(u64 a) { return hosted_mmio_read(a, 4); }
static inline void mmio_write32(u64 a, u32 v) { hosted_mmio_write(a, 4, v); }
#else
static inline void outb(u16 port, u8 v) { __asm__ __volatile__("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ __volatile__("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
/* One plain mov per access: the VMM (or KVM's instruction emulator) decodes it. */
static inline u8 mmio_read8(u64 a)
{
    u8 v;
    __asm__ __volatile__("movb (%1), %0" : "=q"(v) : "r"(a) : "memory");
    return v;
}
static inline u16 mmio_read16(u64 a)
{
    u16 v;
    __asm__ __volatile__("movw (%1), %0" : "=r"(v) : "r"(a) : "memory");
    return v;
}
static inline u32 mmio_read32(u64 a)
{
    u32 v;
    __asm__ __volatile__("movl (%1), %0" : "=r"(v) : "r"(a) : "memory");
    return v;
}
static inline void mmio_write32(u64 a, u32 v)
{
    __asm__ __volatile__("movl %0, (%1)" : : "r"(v), "r"(a) : "memory");
}
#endif

/* In the hosted test build the C library is linked too: the guest's own
 * printf family and exit get other names there, and libc's mem and str
 * functions are used. */
#ifdef GUEST_HOSTED
#define printf guest_printf
#define vprintf guest_vprintf
#define snprintf guest_snprintf
#define vsnprintf guest_vsnprintf
#define exit guest_exit
#define main guest_main
#endif

/* ---- lifetime ---- */
extern struct boot_info *g_boot;
void rt_init(struct boot_info *bi); /* called by _start before main */
NORETURN void exit(int status);
NORETURN void panic(const char *fmt, ...) PRINTF_LIKE(1, 2);

/* ---- printing (UART) ---- */
void uart_putc(char c);
void uart_puts(const char *s); /* no newline added */
void print_dec(u64 v);
void print_hex(u64 v);
/* %d %i %u %x %X %c %s %p %% with flags '0' '-', a width, and l/ll/z/h
 * length modifiers. */
int printf(const char *fmt, ...) PRINTF_LIKE(1, 2);
int vprintf(const char *fmt, va_list ap);
int snprintf(char *buf, size_t n, const char *fmt, ...) PRINTF_LIKE(3, 4);
int vsnprintf(char *buf, size_t n, const char *fmt, va_list ap);
/* Print one "<prefix><message>\n" line (e.g. "BLKBENCH FAIL: ..."); returns 1,
 * the exit status of a failed run. */
int fail_line(const char *prefix, const char *fmt, ...) PRINTF_LIKE(2, 3);

/* ---- memory ---- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);

/* Bump allocator over [free_start, free_end).  Never freed.  alloc() does
 * not clear (fresh guest RAM is zero anyway); zalloc() does.  Panics when
 * RAM runs out. */
void *alloc(u64 size, u64 align);
void *zalloc(u64 size, u64 align);
u64 alloc_remaining(void);

/* Buffers the device accesses: guest-physical == virtual (identity map). */
static inline u64 gpa(const void *p) { return (u64)(uintptr_t)p; }

/* ---- clock ---- */
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ __volatile__("pause" ::: "memory"); }
void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d);

/* TSC frequency in kHz, found at rt_init from (first that works): cmdline
 * tsc_khz=N, CPUID 0x40000010 (hypervisor timing leaf), CPUID 0x15/0x16, and,
 * only with cmdline pit=1, a PIT channel 2 calibration (needs an in-kernel
 * PIT).  0 when unknown. */
extern u64 g_tsc_khz;
extern const char *g_tsc_source; /* "cmdline", "cpuid-hv", "cpuid-15", "cpuid-16", "pit", "none" */
/* cycles -> microseconds / nanoseconds; with an unknown frequency these
 * assume ASSUMED_TSC_KHZ (only ever used for timeouts). */
#define ASSUMED_TSC_KHZ 3000000ull
u64 tsc_khz_or_assumed(void);
u64 cycles_to_us(u64 cycles);
u64 us_to_cycles(u64 us);
/* events per second from a count and a cycle span; 0 if the frequency is unknown */
u64 rate_per_sec(u64 count, u64 cycles);

/* ---- cmdline: space separated key=value words (bare `key` means key=1) ---- */
const char *cmdline(void);
/* copies the value into buf (NUL-terminated); returns 1 if the key is present */
int cmd_get(const char *key, char *buf, size_t n);
u64 cmd_u64(const char *key, u64 dflt); /* decimal, 0x hex, K/M/G suffix */
int cmd_is(const char *key, const char *value, int dflt); /* value compare; dflt if absent */
u64 parse_u64(const char *s, int *ok);

/* ---- PRNG (xorshift64*) ---- */
struct rng {
    u64 s;
};
void rng_seed(struct rng *r, u64 seed);
u64 rng_next(struct rng *r);
u64 rng_below(struct rng *r, u64 n); /* uniform enough in [0, n) */
u64 mix64(u64 x);                    /* a stateless 64-bit mixer */

#endif
