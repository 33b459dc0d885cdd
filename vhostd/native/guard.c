/* The SIGBUS guard.
 *
 * The front-end could shrink a memfd after we mapped it; touching the lost
 * pages raises SIGBUS.  Workers run ring processing and request completions
 * under a guard that turns such a fault into a broken queue instead of a
 * dead daemon.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>

#include "vd.h"

static __thread sigjmp_buf *guard_jb __attribute__((tls_model("initial-exec")));
static __thread void *guard_addr __attribute__((tls_model("initial-exec"))); /* where the fault a guard caught happened */
static struct sigaction old_sigbus;
static pthread_once_t sigbus_once = PTHREAD_ONCE_INIT;

static void on_sigbus(int sig, siginfo_t *info, void *uctx)
{
    if (guard_jb) {
        guard_addr = info->si_addr;
        siglongjmp(*guard_jb, 1);
    }
    /* Not ours: behave as before we were installed. */
    if (old_sigbus.sa_flags & SA_SIGINFO && old_sigbus.sa_sigaction) {
        old_sigbus.sa_sigaction(sig, info, uctx);
        return;
    }
    if (old_sigbus.sa_handler != SIG_DFL && old_sigbus.sa_handler != SIG_IGN && old_sigbus.sa_handler) {
        old_sigbus.sa_handler(sig);
        return;
    }
    signal(SIGBUS, SIG_DFL);
    raise(SIGBUS);
}

static void install_sigbus(void)
{
    struct sigaction sa = {0};
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &old_sigbus);
}

/* Run fn(arg) on q's behalf; a SIGBUS inside breaks q instead of the daemon.
 * Guards nest: the innermost one catches, then the outer one is back.  The
 * signal mask is not saved (a syscall each time, and this runs for every
 * batch): the handler runs with SA_NODEFER and an empty sa_mask, so jumping
 * out of it leaves the mask as it was. */
int vd_run_guarded(struct vd_queue *q, int (*fn)(void *), void *arg)
{
    sigjmp_buf jb;
    sigjmp_buf *outer = guard_jb;
    if (sigsetjmp(jb, 0)) {
        guard_jb = outer;
        vd_queue_fail(q, "queue %d: guest memory access faulted (SIGBUS): the front-end shrank shared memory",
                      q->index);
        if (q->dev->batch_done) /* the batch broke off: the device lets go of what it held */
            q->dev->batch_done(q->dev->ctx, q);
        return 0;
    }
    guard_jb = &jb;
    int r = fn(arg);
    guard_jb = outer;
    return r;
}

/* Run fn(arg); after a SIGBUS inside, return VD_FAULTED with the faulting
 * address in *addr and leave it to the caller to decide whose memory that
 * was (e.g. one guest's frame copied into another guest's buffers).  The
 * handler runs with SA_NODEFER and an empty mask, so the signal mask need
 * not be saved: no syscall per call. */
int vd_try_guarded(int (*fn)(void *), void *arg, void **addr)
{
    sigjmp_buf jb;
    sigjmp_buf *outer = guard_jb;
    if (sigsetjmp(jb, 0)) {
        guard_jb = outer;
        *addr = guard_addr;
        return VD_FAULTED;
    }
    guard_jb = &jb;
    int r = fn(arg);
    guard_jb = outer;
    return r;
}

void vd_guard_install(void)
{
    pthread_once(&sigbus_once, install_sigbus);
}
