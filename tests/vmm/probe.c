/* probe: a tiny payload under the guest ABI (guest-drivers/ABI.md) for the VMM tests. */
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

struct boot_device { u64 mmio_base; u32 device_id; u32 irq; };
struct boot_info {
    u64 magic; u32 version, num_devices; u64 memory, free_start, free_end;
    char cmdline[256]; struct boot_device devices[16];
};

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 mmio32(u64 a) { u32 v; __asm__ volatile("movl (%1), %0" : "=r"(v) : "r"(a) : "memory"); return v; }

static void putc_(char c) { while (!(inb(0x3f8 + 5) & 0x20)) ; outb(0x3f8, (u8)c); }
static void puts_(const char *s) { while (*s) putc_(*s++); }
static void putu(u64 v) { char b[24]; int i = 23; b[i] = 0; do { b[--i] = (char)('0' + v % 10); v /= 10; } while (v); puts_(b + i); }
static void puthex(u64 v) { char b[24]; int i = 23; b[i] = 0; do { b[--i] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v); puts_("0x"); puts_(b + i); }
static __attribute__((noreturn)) void leave(u32 status) { for (;;) outl(0x501, status); }

/* The decimal value of `key=N` in the cmdline, or dflt. */
static u64 arg(const char *cmd, const char *key, u64 dflt)
{
    for (const char *p = cmd; *p; p++) {
        if (p != cmd && p[-1] != ' ')
            continue;
        const char *k = key, *q = p;
        while (*k && *q == *k) { k++; q++; }
        if (*k || *q != '=')
            continue;
        u64 v = 0;
        for (q++; *q >= '0' && *q <= '9'; q++)
            v = v * 10 + (u64)(*q - '0');
        return v;
    }
    return dflt;
}

void probe_main(struct boot_info *bi)
{
    if (bi->magic != 0x564844424F4F5431ull) { puts_("probe: bad boot info\n"); leave(98); }
    const char *cmd = bi->cmdline;
    puts_("probe: hello version="); putu(bi->version);
    puts_(" devices="); putu(bi->num_devices);
    puts_(" memory="); putu(bi->memory);
    puts_(" free="); puthex(bi->free_start); puts_("-"); puthex(bi->free_end);
    puts_(" cmdline=\""); puts_(cmd); puts_("\"\n");
    for (u32 i = 0; i < bi->num_devices && i < 16; i++) {
        u64 b = bi->devices[i].mmio_base;
        puts_("probe: dev"); putu(i);
        puts_(" base="); puthex(b);
        puts_(" irq="); putu(bi->devices[i].irq);
        puts_(" magic="); puthex(mmio32(b));
        puts_(" version="); putu(mmio32(b + 4));
        puts_(" id="); putu(mmio32(b + 8));
        if (mmio32(b + 8) == 2) {
            u64 cap = mmio32(b + 0x100) | (u64)mmio32(b + 0x104) << 32;
            puts_(" capacity="); putu(cap);
        }
        puts_("\n");
    }
    u64 n = arg(cmd, "exits", 0);
    for (u64 i = 0; i < n; i++)
        outb(0x80, 0);
    if (arg(cmd, "crash", 0))
        *(volatile u64 *)(1ull << 40) = 1; /* beyond the 4 GiB identity map: #PF */
    if (arg(cmd, "spin", 0))
        for (;;)
            __asm__ volatile("pause" ::: "memory");
    puts_("probe: bye\n");
    leave((u32)arg(cmd, "exit", 0));
}

__asm__(".section .text.start, \"ax\"\n"
        ".globl _start\n"
        "_start:\n"
        "    call probe_main\n"
        "1:  jmp 1b\n"
        ".previous\n");
