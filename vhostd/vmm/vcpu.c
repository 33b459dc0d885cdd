/* The vCPU exit loop; see vcpu.h. */
#include "vcpu.h"

#include <errno.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#define EXPORT __attribute__((visibility("default")))

/* virtio-mmio registers (virtio 1.2 section 4.2.2) and status bits. */
#define REG_INTERRUPT_STATUS 0x060
#define REG_INTERRUPT_ACK 0x064
#define INT_VRING 1u

struct vcpu_isr {
    pthread_mutex_t lock; /* vCPUs of one VM and the device model share it */
    uint32_t num_queues;
    uint32_t bits;        /* raised, not computed (config change) */
    uint64_t fast_exits;
    uint32_t packed_running; /* started packed queues */
    struct isr_queue {
        const volatile uint16_t *used_idx; /* NULL: not started, or packed */
        uint16_t acked;
        uint8_t packed;
    } q[];
};

EXPORT struct vcpu_isr *vcpu_isr_new(uint32_t num_queues)
{
    struct vcpu_isr *isr = calloc(1, sizeof(*isr) + num_queues * sizeof(isr->q[0]));
    if (!isr)
        return NULL;
    pthread_mutex_init(&isr->lock, NULL);
    isr->num_queues = num_queues;
    return isr;
}

EXPORT void vcpu_isr_free(struct vcpu_isr *isr)
{
    if (!isr)
        return;
    pthread_mutex_destroy(&isr->lock);
    free(isr);
}

EXPORT int vcpu_isr_start_queue(struct vcpu_isr *isr, uint32_t queue, const void *used_idx)
{
    if (queue >= isr->num_queues)
        return -EINVAL;
    pthread_mutex_lock(&isr->lock);
    if (isr->q[queue].packed)
        isr->packed_running--;
    isr->q[queue].packed = !used_idx;
    if (!used_idx) {
        isr->packed_running++;
    } else {
        isr->q[queue].used_idx = used_idx;
        isr->q[queue].acked = __atomic_load_n((const uint16_t *)used_idx, __ATOMIC_ACQUIRE);
    }
    pthread_mutex_unlock(&isr->lock);
    return 0;
}

EXPORT void vcpu_isr_stop_queue(struct vcpu_isr *isr, uint32_t queue)
{
    if (queue >= isr->num_queues)
        return;
    pthread_mutex_lock(&isr->lock);
    isr->q[queue].used_idx = NULL;
    if (isr->q[queue].packed)
        isr->packed_running--;
    isr->q[queue].packed = 0;
    pthread_mutex_unlock(&isr->lock);
}

EXPORT void vcpu_isr_raise(struct vcpu_isr *isr, uint32_t bits)
{
    pthread_mutex_lock(&isr->lock);
    isr->bits |= bits & ~INT_VRING;
    pthread_mutex_unlock(&isr->lock);
}

/* Bit 0 is computed: a started split queue's used index moved since the
 * driver last acknowledged it (the back-end's interrupt went to KVM
 * directly).  A packed ring has no used index, and how far each used
 * descriptor moves the device's position is known only to the driver, so
 * while a packed queue runs bit 0 is always set: the driver then looks at
 * its rings on every interrupt, and interrupts come only from the back-end
 * when it has used buffers to hand back. */
EXPORT uint32_t vcpu_isr_status(struct vcpu_isr *isr)
{
    pthread_mutex_lock(&isr->lock);
    uint32_t bits = isr->bits | (isr->packed_running ? INT_VRING : 0);
    for (uint32_t i = 0; i < isr->num_queues; i++) {
        const volatile uint16_t *used = isr->q[i].used_idx;
        if (used && __atomic_load_n((const uint16_t *)used, __ATOMIC_ACQUIRE) != isr->q[i].acked) {
            bits |= INT_VRING;
            break;
        }
    }
    pthread_mutex_unlock(&isr->lock);
    return bits;
}

EXPORT void vcpu_isr_ack(struct vcpu_isr *isr, uint32_t bits)
{
    pthread_mutex_lock(&isr->lock);
    if (bits & INT_VRING)
        for (uint32_t i = 0; i < isr->num_queues; i++)
            if (isr->q[i].used_idx)
                isr->q[i].acked = __atomic_load_n((const uint16_t *)isr->q[i].used_idx, __ATOMIC_ACQUIRE);
    isr->bits &= ~(bits & ~INT_VRING);
    pthread_mutex_unlock(&isr->lock);
}

EXPORT uint64_t vcpu_isr_fast_exits(struct vcpu_isr *isr)
{
    return __atomic_load_n(&isr->fast_exits, __ATOMIC_RELAXED);
}

/* Answers an MMIO exit when it is a 4-byte InterruptStatus read or
 * InterruptACK write of a known device; false sends it to Python. */
static int answer_mmio(struct kvm_run *run, const struct vcpu_mmio_map *map)
{
    uint64_t gpa = run->mmio.phys_addr;
    if (run->mmio.len != 4 || gpa < map->mmio_base || !map->stride)
        return 0;
    uint64_t index = (gpa - map->mmio_base) / map->stride;
    uint64_t offset = (gpa - map->mmio_base) % map->stride;
    if (index >= map->num_devices || !map->devices[index])
        return 0;
    struct vcpu_isr *isr = map->devices[index];
    if (offset == REG_INTERRUPT_STATUS && !run->mmio.is_write) {
        uint32_t bits = vcpu_isr_status(isr);
        memcpy(run->mmio.data, &bits, 4);
    } else if (offset == REG_INTERRUPT_ACK && run->mmio.is_write) {
        uint32_t bits;
        memcpy(&bits, run->mmio.data, 4);
        vcpu_isr_ack(isr, bits);
    } else {
        return 0;
    }
    __atomic_add_fetch(&isr->fast_exits, 1, __ATOMIC_RELAXED);
    return 1;
}

EXPORT int vcpu_run(int vcpu_fd, void *run_page, const struct vcpu_mmio_map *map)
{
    struct kvm_run *run = run_page;
    for (;;) {
        if (ioctl(vcpu_fd, KVM_RUN, 0) < 0)
            return -errno;
        if (run->exit_reason == KVM_EXIT_MMIO && map && answer_mmio(run, map))
            continue;
        return (int)run->exit_reason;
    }
}
