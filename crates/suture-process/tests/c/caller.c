/* Target for Hijack::call: functions to call remotely (their addresses are
 * printed on startup), a ticker thread writing "tick N" to stderr every
 * 2 ms, and a main thread serving commands on stdin:
 *   echo X   -> "echo X"
 *   spin     -> loads xmm0..xmm15 with known values, prints "spinning", spins
 *               until `spin_flag` becomes nonzero (written by the test), then
 *               checks the registers and prints "xmm ok" or "xmm bad N"
 *   result   -> "result R" with the value double_work stored
 * SIGSEGV, if ever delivered, prints "caught SIGSEGV" and exits. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "commands.h"

volatile int spin_flag;
volatile double work_result;

__attribute__((noinline, used)) long add3(long a, long b, long c) { return a + b + c; }

/* Floating-point work that uses many xmm registers; stores and returns the
 * result (as an integer, to come back in rax). */
__attribute__((noinline, used)) long double_work(long n) {
    double acc[8] = {0};
    for (long i = 1; i <= n; i++)
        for (int k = 0; k < 8; k++)
            acc[k] += (double)(i * (k + 1)) * 0.5;
    double sum = 0;
    for (int k = 0; k < 8; k++)
        sum += acc[k];
    work_result = sum;
    return (long)sum;
}

/* Explicitly clobbers every xmm register. */
__attribute__((noinline, used)) long clobber_xmm(void) {
    __asm__ volatile("pcmpeqd %%xmm0, %%xmm0\n\t"
                     "movdqa %%xmm0, %%xmm1\n\tmovdqa %%xmm0, %%xmm2\n\t"
                     "movdqa %%xmm0, %%xmm3\n\tmovdqa %%xmm0, %%xmm4\n\t"
                     "movdqa %%xmm0, %%xmm5\n\tmovdqa %%xmm0, %%xmm6\n\t"
                     "movdqa %%xmm0, %%xmm7\n\tmovdqa %%xmm0, %%xmm8\n\t"
                     "movdqa %%xmm0, %%xmm9\n\tmovdqa %%xmm0, %%xmm10\n\t"
                     "movdqa %%xmm0, %%xmm11\n\tmovdqa %%xmm0, %%xmm12\n\t"
                     "movdqa %%xmm0, %%xmm13\n\tmovdqa %%xmm0, %%xmm14\n\t"
                     "movdqa %%xmm0, %%xmm15\n\t" ::
                         : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
                           "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14",
                           "xmm15");
    return 7;
}

/* Returns the stack pointer it sees at entry + 8 modulo 16 (the ABI wants 0). */
__attribute__((noinline, used, naked)) long entry_alignment(void) {
    __asm__ volatile("lea 8(%rsp), %rax\n\t"
                     "and $15, %rax\n\t"
                     "ret\n\t");
}

__attribute__((noinline, used)) long crash(void) {
    *(volatile int *)0 = 0;
    return 1;
}

__attribute__((noinline, used)) long forever(void) {
    for (;;)
        __asm__ volatile("pause" ::: "memory");
    return 0;
}

static void on_segv(int sig) {
    (void)sig;
    static const char msg[] = "caught SIGSEGV\n";
    write(1, msg, sizeof msg - 1);
    _exit(3);
}

static unsigned char pattern[16][16];

static void spin(void) {
    unsigned char out[16][16];
    for (int r = 0; r < 16; r++)
        for (int b = 0; b < 16; b++)
            pattern[r][b] = (unsigned char)(r * 16 + b + 1);
    printf("spinning\n");
    __asm__ volatile(
        "movdqu 0(%[in]), %%xmm0\n\tmovdqu 16(%[in]), %%xmm1\n\t"
        "movdqu 32(%[in]), %%xmm2\n\tmovdqu 48(%[in]), %%xmm3\n\t"
        "movdqu 64(%[in]), %%xmm4\n\tmovdqu 80(%[in]), %%xmm5\n\t"
        "movdqu 96(%[in]), %%xmm6\n\tmovdqu 112(%[in]), %%xmm7\n\t"
        "movdqu 128(%[in]), %%xmm8\n\tmovdqu 144(%[in]), %%xmm9\n\t"
        "movdqu 160(%[in]), %%xmm10\n\tmovdqu 176(%[in]), %%xmm11\n\t"
        "movdqu 192(%[in]), %%xmm12\n\tmovdqu 208(%[in]), %%xmm13\n\t"
        "movdqu 224(%[in]), %%xmm14\n\tmovdqu 240(%[in]), %%xmm15\n\t"
        "1: pause\n\t"
        "cmpl $0, %[flag]\n\t"
        "je 1b\n\t"
        "movdqu %%xmm0, 0(%[out])\n\tmovdqu %%xmm1, 16(%[out])\n\t"
        "movdqu %%xmm2, 32(%[out])\n\tmovdqu %%xmm3, 48(%[out])\n\t"
        "movdqu %%xmm4, 64(%[out])\n\tmovdqu %%xmm5, 80(%[out])\n\t"
        "movdqu %%xmm6, 96(%[out])\n\tmovdqu %%xmm7, 112(%[out])\n\t"
        "movdqu %%xmm8, 128(%[out])\n\tmovdqu %%xmm9, 144(%[out])\n\t"
        "movdqu %%xmm10, 160(%[out])\n\tmovdqu %%xmm11, 176(%[out])\n\t"
        "movdqu %%xmm12, 192(%[out])\n\tmovdqu %%xmm13, 208(%[out])\n\t"
        "movdqu %%xmm14, 224(%[out])\n\tmovdqu %%xmm15, 240(%[out])\n\t"
        :
        : [in] "r"(pattern), [out] "r"(out), [flag] "m"(spin_flag)
        : "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
          "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
    spin_flag = 0;
    for (int r = 0; r < 16; r++)
        if (memcmp(out[r], pattern[r], 16) != 0) {
            printf("xmm bad %d\n", r);
            return;
        }
    printf("xmm ok\n");
}

static void command(char *line)
{
    if (!strncmp(line, "echo ", 5))
        printf("echo %s\n", line + 5);
    else if (!strcmp(line, "spin"))
        spin();
    else if (!strcmp(line, "result"))
        printf("result %.1f\n", work_result);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGSEGV, on_segv);
    pthread_t t;
    pthread_create(&t, NULL, ticker, NULL);
    printf("add3 %p\n", (void *)add3);
    printf("double_work %p\n", (void *)double_work);
    printf("clobber_xmm %p\n", (void *)clobber_xmm);
    printf("entry_alignment %p\n", (void *)entry_alignment);
    printf("crash %p\n", (void *)crash);
    printf("forever %p\n", (void *)forever);
    printf("spin_flag %p\n", (void *)&spin_flag);
    printf("ready\n");
    return serve_commands(command);
}
