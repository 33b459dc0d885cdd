/* Runs a guest program (built with -DGUEST_HOSTED) as a Linux process
 * against the fake devices of fakedev.c.
 *
 *   hosted-PROG [-m RAM_MB] [-b SECTORS] [-B SECTORS] [-n loopback|sink]
 *               [-P] [-E] [-I] [-p] [-M 0|1|2] [-q QMAX] [-Q BLK_QUEUES]
 *               [-S SIZE_MAX] [-R] [-V] [-c CMDLINE]
 *
 *   -b/-B  a blk device (-B read-only)     -n   a net device
 *   -P     two processes, each with one net device on a shared switch
 *   -E/-I  do not offer EVENT_IDX / INDIRECT_DESC
 *   -p     offer RING_PACKED (the programs take it unless packed=0)
 *   -M     MRG_RXBUF: 0 not offered, 1 offered, 2 offered and frames split
 *          over 700-byte pieces of buffers
 *   -R     complete blk requests of a batch in reverse order
 *   -V     violations are expected (garbage mode): exit 4 if there are none
 * Exit status: the program's, 3 on unexpected violations.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fakedev.h"
#include "rt.h"
#undef main
#undef exit
#undef printf
#undef vprintf
#undef snprintf
#undef vsnprintf

int guest_main(struct boot_info *bi);

static int expect_violations;
static char prefix[8];
static char line[4096];
static size_t line_len;

static void flush_line(void)
{
    if (!line_len)
        return;
    fprintf(stdout, "%s%.*s", prefix, (int)line_len, line);
    fflush(stdout);
    line_len = 0;
}

void hosted_outb(u16 port, u8 v)
{
    if (port == UART_PORT) {
        if (line_len < sizeof(line))
            line[line_len++] = (char)v;
        if (v == '\n' || line_len == sizeof(line))
            flush_line();
        return;
    }
    fprintf(stderr, "HOSTED: outb to port 0x%x\n", port);
}

void hosted_outl(u16 port, u32 v)
{
    if (port != EXIT_PORT) {
        fprintf(stderr, "HOSTED: outl to port 0x%x\n", port);
        return;
    }
    flush_line();
    fake_summary();
    int code = (int)(v & 0xff);
    if (fake_violations() && !expect_violations) {
        fprintf(stderr, "HOSTED: the driver broke the rules (violations above)\n");
        code = 3;
    } else if (!fake_violations() && expect_violations) {
        fprintf(stderr, "HOSTED: violations were expected\n");
        code = 4;
    }
    fflush(stdout);
    fflush(stderr);
    _exit(code);
}

u8 hosted_inb(u16 port)
{
    fprintf(stderr, "HOSTED: inb from port 0x%x\n", port);
    return 0;
}

struct dev_spec {
    char kind; /* b B n */
    u64 sectors;
    const char *mode;
};

static int run(u64 ram_mb, struct dev_spec *specs, int nspecs, const char *cmdline, const struct fake_opts *fo,
               int port)
{
    u64 size = ram_mb << 20;
    u8 *ram = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (ram == MAP_FAILED) {
        perror("mmap");
        return 2;
    }
    fake_init((u64)(uintptr_t)ram, (u64)(uintptr_t)ram + size, fo);
    if (port >= 0)
        fake_switch_port(port);
    struct boot_info *bi = (struct boot_info *)ram;
    memset(bi, 0, sizeof(*bi));
    bi->magic = VHOSTD_BOOT_MAGIC;
    bi->version = 1;
    bi->memory = (u64)(uintptr_t)ram + size; /* hosted: RAM is [ram, ram+size) */
    bi->free_start = (u64)(uintptr_t)ram + 4096;
    bi->free_end = bi->memory;
    snprintf(bi->cmdline, sizeof(bi->cmdline), "%s", cmdline);
    for (int i = 0; i < nspecs; i++) {
        u8 mac[6] = {0x52, 0x54, 0x00, 0x00, (u8)(port < 0 ? 0 : port), (u8)i};
        struct boot_device *bd = &bi->devices[bi->num_devices++];
        if (specs[i].kind == 'n') {
            bd->mmio_base = fake_add_net(specs[i].mode, mac);
            bd->device_id = VIRTIO_ID_NET;
        } else {
            bd->mmio_base = fake_add_blk(specs[i].sectors, specs[i].kind == 'B', "fake-serial-0123");
            bd->device_id = VIRTIO_ID_BLK;
        }
    }
    fake_start();
    rt_init(bi);
    int rc = guest_main(bi);
    hosted_outl(EXIT_PORT, (u32)rc); /* does not return */
    return 2;
}

int main(int argc, char **argv)
{
    struct fake_opts fo = {.event_idx = 1, .indirect = 1, .mrg_rxbuf = 1, .net_mac = 1, .queue_max = 256,
                           .blk_queues = 1, .size_max = 0, .reorder = 0};
    struct dev_spec specs[16];
    int nspecs = 0, peer = 0, opt;
    u64 ram_mb = 256;
    const char *cmdline = "";
    while ((opt = getopt(argc, argv, "m:b:B:n:PEIpM:q:Q:S:RVc:")) != -1) {
        switch (opt) {
        case 'm': ram_mb = strtoull(optarg, 0, 0); break;
        case 'b':
        case 'B':
            specs[nspecs++] = (struct dev_spec){(char)opt, strtoull(optarg, 0, 0), 0};
            break;
        case 'n': specs[nspecs++] = (struct dev_spec){'n', 0, optarg}; break;
        case 'P': peer = 1; break;
        case 'E': fo.event_idx = 0; break;
        case 'I': fo.indirect = 0; break;
        case 'p': fo.packed = 1; break;
        case 'M': fo.mrg_rxbuf = atoi(optarg); break;
        case 'q': fo.queue_max = (u32)strtoul(optarg, 0, 0); break;
        case 'Q': fo.blk_queues = (u32)strtoul(optarg, 0, 0); break;
        case 'S': fo.size_max = (u32)strtoul(optarg, 0, 0); break;
        case 'R': fo.reorder = 1; break;
        case 'V': expect_violations = 1; break;
        case 'c': cmdline = optarg; break;
        default: fprintf(stderr, "usage: see hosted_main.c\n"); return 2;
        }
    }
    if (!peer)
        return run(ram_mb, specs, nspecs, cmdline, &fo, -1);

    /* two guests, one switch: each child has one net device on it */
    fake_switch_create();
    pid_t pids[2];
    for (int p = 0; p < 2; p++) {
        pids[p] = fork();
        if (pids[p] == 0) {
            snprintf(prefix, sizeof(prefix), "[%c] ", 'A' + p);
            struct dev_spec s = {'n', 0, "switch"};
            if (p == 1)
                usleep(300000); /* start late: the first guest must wait for it */
            return run(ram_mb, &s, 1, cmdline, &fo, p);
        }
    }
    int rc = 0;
    for (int p = 0; p < 2; p++) {
        int st;
        waitpid(pids[p], &st, 0);
        int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        fprintf(stderr, "HOSTED: guest %c exited %d\n", 'A' + p, code);
        if (code && !rc)
            rc = code;
    }
    return rc;
}
