/* Guest-side 4 KiB random reads, queue depth 1, O_DIRECT: the IOPS a VM
 * sees from its disk.  Static, for the test guest's busybox initramfs.
 *     randread DEVICE SECONDS      prints "VHOSTD-RESULT iops=N" */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 3)
        return 2;
    int fd = open(argv[1], O_RDONLY | O_DIRECT);
    if (fd < 0) {
        perror(argv[1]);
        return 1;
    }
    off_t blocks = lseek(fd, 0, SEEK_END) / 4096;
    void *buf;
    if (blocks <= 0 || posix_memalign(&buf, 4096, 4096))
        return 1;
    uint64_t x = 88172645463325252ull, n = 0;
    double end = now() + atof(argv[2]), t0 = now();
    while (now() < end) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17; /* xorshift64 */
        if (pread(fd, buf, 4096, (off_t)(x % (uint64_t)blocks) * 4096) != 4096) {
            perror("pread");
            return 1;
        }
        n++;
    }
    printf("VHOSTD-RESULT iops=%.0f\n", n / (now() - t0));
    return 0;
}
