/* Debug aid for crashes inside native libraries loaded by Python (LD_PRELOAD=segv_trace.so):
 * on SIGSEGV/SIGBUS/SIGABRT prints the faulting address and the C backtrace (library+offset; feed
 * the offsets to `addr2line -f -e LIB`), then dies with the signal as before.
 *   gcc -shared -fPIC -O1 -o /tmp/segv_trace.so benchmarks/gpu/segv_trace.c
 */
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void on_fault(int sig, siginfo_t *si, void *uc) {
    (void)uc;
    char line[96];
    int n = snprintf(line, sizeof line, "\n*** signal %d at address %p; C backtrace:\n", sig, si->si_addr);
    if (write(2, line, (size_t)n) < 0) { /* nothing to do */ }
    void *frames[64];
    backtrace_symbols_fd(frames, backtrace(frames, 64), 2);
    signal(sig, SIG_DFL);
    raise(sig);
}

__attribute__((constructor)) static void install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, NULL);
    sigaction(SIGBUS, &sa, NULL);
    sigaction(SIGABRT, &sa, NULL);
}
