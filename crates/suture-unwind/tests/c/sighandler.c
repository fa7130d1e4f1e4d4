/* A thread stopped inside a signal handler: the worker raises SIGUSR1 at
 * itself and the handler blocks in pause(). Prints `handler TID` from the
 * handler; `ready` once the handler runs. The main thread blocks reading
 * stdin. */
#define _GNU_SOURCE
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static volatile long sink;
static sem_t in_handler;

__attribute__((noinline, noclone)) void on_signal(int sig)
{
    char line[64];
    int n = snprintf(line, sizeof line, "handler %ld\n", (long)syscall(SYS_gettid));
    if (write(1, line, n) != n)
        return;
    sem_post(&in_handler);
    sink += pause();
    sink += sig;
}

static void *worker(void *arg)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGUSR1, &sa, 0);
    raise(SIGUSR1);
    return arg;
}

int main(void)
{
    pthread_t t;
    char c;
    if (sem_init(&in_handler, 0, 0) || pthread_create(&t, 0, worker, 0))
        return 1;
    sem_wait(&in_handler);
    printf("ready\n");
    fflush(stdout);
    return read(0, &c, 1) < 0;
}
