/* A thread spinning in anonymous executable memory: a copy of a tiny loop
 * that first sets a flag (`movl $1, (%rdi)`) and then jumps to itself
 * forever. Prints `thread TID` and `jit ADDR`; `ready` once the flag is set
 * (the thread is then inside the copy for good). The main thread blocks
 * reading stdin. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

static volatile int entered;

static void *spinner(void *arg)
{
    void (*code)(volatile int *) = (void (*)(volatile int *))arg;
    printf("thread %ld\n", (long)syscall(SYS_gettid));
    fflush(stdout);
    code(&entered);
    return 0;
}

int main(void)
{
    static const unsigned char loop[] = {0xc7, 0x07, 0x01, 0x00, 0x00, 0x00, 0xeb, 0xfe};
    pthread_t t;
    char c;
    void *p = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return 1;
    memcpy(p, loop, sizeof loop);
    if (mprotect(p, 4096, PROT_READ | PROT_EXEC))
        return 1;
    if (pthread_create(&t, 0, spinner, p))
        return 1;
    while (!entered)
        sched_yield();
    printf("jit %p\nready\n", p);
    fflush(stdout);
    return read(0, &c, 1) < 0;
}
