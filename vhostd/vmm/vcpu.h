/* The vCPU exit loop (module vhostd._vcpu).
 *
 * KVM_RUN runs here with the GIL released, and the exits a virtio-mmio
 * driver makes for every interrupt (read InterruptStatus, write
 * InterruptACK) are answered here without returning to Python; every other
 * exit goes back to vm.py.  The interrupt state of a device lives in a
 * struct vcpu_isr that both this loop and virtio_mmio.py (through the
 * functions below) use under its own lock.
 */
#include <stdint.h>

struct vcpu_isr;

/* One device's interrupt state; NULL when out of memory. */
struct vcpu_isr *vcpu_isr_new(uint32_t num_queues);
void vcpu_isr_free(struct vcpu_isr *isr);
/* A started queue: its used index is the 16-bit word at used_idx (a host
 * address inside guest RAM, checked by the caller); what is there now
 * counts as acknowledged.  NULL: a packed ring (see vcpu_isr_status). */
int vcpu_isr_start_queue(struct vcpu_isr *isr, uint32_t queue, const void *used_idx);
void vcpu_isr_stop_queue(struct vcpu_isr *isr, uint32_t queue);
/* Sets status bits that are not computed from rings (config change). */
void vcpu_isr_raise(struct vcpu_isr *isr, uint32_t bits);
/* InterruptStatus and InterruptACK. */
uint32_t vcpu_isr_status(struct vcpu_isr *isr);
void vcpu_isr_ack(struct vcpu_isr *isr, uint32_t bits);
/* Register accesses answered here since the device was made. */
uint64_t vcpu_isr_fast_exits(struct vcpu_isr *isr);

/* What the exit loop of one VM may answer by itself: virtio-mmio windows
 * of `stride` bytes from `mmio_base`, device i's state in devices[i]
 * (NULL: not a device the loop knows). */
struct vcpu_mmio_map {
    uint64_t mmio_base;
    uint64_t stride;
    uint32_t num_devices;
    struct vcpu_isr **devices;
};

/* KVM_RUN on vcpu_fd (whose kvm_run page is mapped at run) until an exit
 * this loop does not answer.  Returns the exit reason, or -errno when
 * KVM_RUN failed (-EINTR: a signal or immediate_exit). */
int vcpu_run(int vcpu_fd, void *run, const struct vcpu_mmio_map *map);
