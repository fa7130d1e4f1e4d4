/* A thread that spins inside an rseq critical section (registered by
 * glibc). Each abort (preemption, signal, ...) lands in the abort handler,
 * which counts it and re-enters. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/rseq.h>
#include <sys/syscall.h>
#include <unistd.h>

extern char cs_start[], cs_end[], cs_abort[];
static struct rseq_cs cs_desc;
static volatile unsigned long aborts;
static volatile long spinner_tid;

static void *spinner(void *arg) {
    (void)arg;
    struct rseq *rs = (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
    spinner_tid = syscall(SYS_gettid);
    for (;;) {
        /* Arm with the instruction right before the start, as rseq code must. */
        __asm__ volatile(
            ".globl cs_start, cs_end, cs_abort\n"
            "  movq %[desc], %[field]\n"
            "cs_start:\n"
            "  pause\n"
            "  jmp cs_start\n"
            "cs_end:\n"
            "  .long 0x53053053\n"
            "cs_abort:\n"
            : [field] "=m"(rs->rseq_cs)
            : [desc] "r"((uint64_t)(uintptr_t)&cs_desc)
            : "memory");
        aborts++;
    }
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (__rseq_size == 0) {
        printf("no-rseq\n");
        printf("ready\n");
        return 0;
    }
    cs_desc.version = 0;
    cs_desc.flags = 0;
    cs_desc.start_ip = (uint64_t)(uintptr_t)cs_start;
    cs_desc.post_commit_offset = (uint64_t)(cs_end - cs_start);
    cs_desc.abort_ip = (uint64_t)(uintptr_t)cs_abort;
    pthread_t t;
    pthread_create(&t, NULL, spinner, NULL);
    while (!spinner_tid)
        usleep(100);
    printf("spinner %ld\n", spinner_tid);
    printf("cs %p %p\n", (void *)cs_start, (void *)cs_end);
    printf("abort %p\n", (void *)cs_abort);
    printf("ready\n");
    char buf[256];
    for (;;) {
        ssize_t n = read(0, buf, sizeof buf - 1);
        if (n <= 0)
            return 0;
        buf[n] = 0;
        if (!strncmp(buf, "count", 5))
            printf("aborts %lu\n", aborts);
    }
}
