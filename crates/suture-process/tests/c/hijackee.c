/* Target for tests that kill a hijacking tracer at chosen moments: every
 * thread checks that being borrowed changed nothing it can see.
 *
 * - spinner: keeps known values in ymm0-15, r8-r15 and rbx across a busy
 *   loop (where it is nearly always stopped) and compares them afterwards;
 *   also checks its signal mask (SIGUSR2 blocked) stays the same.
 * - reader: blocked in read() on a pipe; reports every read's result.
 * - sleeper: loops in 20 ms relative nanosleeps; counts failures (EINTR);
 *   long sleeper: the same with 400 ms.
 * Commands: "check" -> "spins N bad M sleeps S sleeperr E maskerr K
 * longsleeps L";
 * "write TEXT" -> the reader prints "reader got TEXT". */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "commands.h"

#define WORDS (16 * 4 + 9)
static uint64_t expect_[WORDS] __attribute__((aligned(32)));
static uint64_t out_[WORDS] __attribute__((aligned(32)));
static volatile long spins, bad, sleeps, sleep_errors, mask_errors, long_sleeps;
static volatile long spinner_tid, reader_tid, sleeper_tid, long_sleeper_tid;
static int pipefd[2];

static void spin_once(long n)
{
    __asm__ volatile(
        "vmovdqu 0(%0), %%ymm0\n\t"
        "vmovdqu 32(%0), %%ymm1\n\t"
        "vmovdqu 64(%0), %%ymm2\n\t"
        "vmovdqu 96(%0), %%ymm3\n\t"
        "vmovdqu 128(%0), %%ymm4\n\t"
        "vmovdqu 160(%0), %%ymm5\n\t"
        "vmovdqu 192(%0), %%ymm6\n\t"
        "vmovdqu 224(%0), %%ymm7\n\t"
        "vmovdqu 256(%0), %%ymm8\n\t"
        "vmovdqu 288(%0), %%ymm9\n\t"
        "vmovdqu 320(%0), %%ymm10\n\t"
        "vmovdqu 352(%0), %%ymm11\n\t"
        "vmovdqu 384(%0), %%ymm12\n\t"
        "vmovdqu 416(%0), %%ymm13\n\t"
        "vmovdqu 448(%0), %%ymm14\n\t"
        "vmovdqu 480(%0), %%ymm15\n\t"
        "mov 512(%0), %%r8\n\t"
        "mov 520(%0), %%r9\n\t"
        "mov 528(%0), %%r10\n\t"
        "mov 536(%0), %%r11\n\t"
        "mov 544(%0), %%r12\n\t"
        "mov 552(%0), %%r13\n\t"
        "mov 560(%0), %%r14\n\t"
        "mov 568(%0), %%r15\n\t"
        "mov 576(%0), %%rbx\n\t"
        "mov %2, %%rax\n\t"
        "1: dec %%rax\n\t"
        "jnz 1b\n\t"
        "vmovdqu %%ymm0, 0(%1)\n\t"
        "vmovdqu %%ymm1, 32(%1)\n\t"
        "vmovdqu %%ymm2, 64(%1)\n\t"
        "vmovdqu %%ymm3, 96(%1)\n\t"
        "vmovdqu %%ymm4, 128(%1)\n\t"
        "vmovdqu %%ymm5, 160(%1)\n\t"
        "vmovdqu %%ymm6, 192(%1)\n\t"
        "vmovdqu %%ymm7, 224(%1)\n\t"
        "vmovdqu %%ymm8, 256(%1)\n\t"
        "vmovdqu %%ymm9, 288(%1)\n\t"
        "vmovdqu %%ymm10, 320(%1)\n\t"
        "vmovdqu %%ymm11, 352(%1)\n\t"
        "vmovdqu %%ymm12, 384(%1)\n\t"
        "vmovdqu %%ymm13, 416(%1)\n\t"
        "vmovdqu %%ymm14, 448(%1)\n\t"
        "vmovdqu %%ymm15, 480(%1)\n\t"
        "mov %%r8, 512(%1)\n\t"
        "mov %%r9, 520(%1)\n\t"
        "mov %%r10, 528(%1)\n\t"
        "mov %%r11, 536(%1)\n\t"
        "mov %%r12, 544(%1)\n\t"
        "mov %%r13, 552(%1)\n\t"
        "mov %%r14, 560(%1)\n\t"
        "mov %%r15, 568(%1)\n\t"
        "mov %%rbx, 576(%1)\n\t"
        "vzeroupper\n\t"
        :
        : "r"(expect_), "r"(out_), "r"(n)
        : "rax", "rbx", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
          "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory", "cc");
}

static void check_mask(int sig_blocked)
{
    sigset_t cur;
    pthread_sigmask(SIG_BLOCK, NULL, &cur);
    for (int s = 1; s < 32; s++) {
        if (s == SIGKILL || s == SIGSTOP)
            continue;
        if (sigismember(&cur, s) != (s == sig_blocked)) {
            mask_errors++;
            printf("mask error thread %ld signal %d\n", (long)syscall(SYS_gettid), s);
            return;
        }
    }
}

static void *spinner(void *arg)
{
    (void)arg;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    spinner_tid = syscall(SYS_gettid);
    for (;;) {
        spin_once(2000000);
        if (memcmp(expect_, out_, sizeof out_) != 0) {
            bad++;
            for (int i = 0; i < WORDS; i++)
                if (expect_[i] != out_[i])
                    printf("bad word %d %llx != %llx\n", i,
                           (unsigned long long)out_[i], (unsigned long long)expect_[i]);
        }
        check_mask(SIGUSR2);
        spins++;
    }
    return NULL;
}

static void *reader(void *arg)
{
    (void)arg;
    reader_tid = syscall(SYS_gettid);
    for (;;) {
        char buf[256];
        ssize_t r = read(pipefd[0], buf, sizeof buf - 1);
        if (r < 0) {
            printf("reader error %d\n", errno);
            continue;
        }
        buf[r] = 0;
        check_mask(0);
        printf("reader got %s\n", buf);
    }
    return NULL;
}

static void *sleeper(void *arg)
{
    (void)arg;
    sleeper_tid = syscall(SYS_gettid);
    for (;;) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        if (nanosleep(&ts, NULL) != 0) {
            sleep_errors++;
            printf("nanosleep error %d\n", errno);
        }
        sleeps++;
    }
    return NULL;
}

static void *long_sleeper(void *arg)
{
    (void)arg;
    long_sleeper_tid = syscall(SYS_gettid);
    for (;;) {
        struct timespec ts = {0, 400 * 1000 * 1000};
        if (nanosleep(&ts, NULL) != 0) {
            sleep_errors++;
            printf("nanosleep error %d\n", errno);
        }
        long_sleeps++;
    }
    return NULL;
}

/* Called by the tests through Hijack::call: busy for a while. */
__attribute__((noinline)) long callee(long x)
{
    for (volatile long i = 0; i < 300000; i++)
        ;
    return x + 1;
}

static void command(char *line)
{
    if (!strcmp(line, "check")) {
        printf("spins %ld bad %ld sleeps %ld sleeperr %ld maskerr %ld longsleeps %ld\n",
               spins, bad, sleeps, sleep_errors, mask_errors, long_sleeps);
    } else if (!strncmp(line, "write ", 6)) {
        if (write(pipefd[1], line + 6, strlen(line + 6)) < 0)
            printf("write error %d\n", errno);
    }
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 0; i < WORDS; i++)
        expect_[i] = 0x0123456789abcdefULL * (uint64_t)(i + 1) ^ ((uint64_t)i << 56);
    if (pipe(pipefd) != 0)
        return 1;
    pthread_t a, b, c, d;
    pthread_create(&a, NULL, spinner, NULL);
    pthread_create(&b, NULL, reader, NULL);
    pthread_create(&c, NULL, sleeper, NULL);
    pthread_create(&d, NULL, long_sleeper, NULL);
    while (!spinner_tid || !reader_tid || !sleeper_tid || !long_sleeper_tid)
        usleep(100);
    printf("spinner %ld\n", spinner_tid);
    printf("reader %ld\n", reader_tid);
    printf("sleeper %ld\n", sleeper_tid);
    printf("longsleeper %ld\n", long_sleeper_tid);
    printf("callee %lx\n", (unsigned long)callee);
    printf("ready\n");
    return serve_commands(command);
}
