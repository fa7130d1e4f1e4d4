/* Every thread blocks in the same call chain: outer -> middle -> inner ->
 * a blocking system call. The main thread reads stdin; four workers read a
 * pipe, pause, sleep and read again. Each thread prints `thread TID NR`
 * (NR: the system call it will block in) before blocking; `ready` follows
 * once every worker has printed. */
#define _GNU_SOURCE
#include <pthread.h>
#include <semaphore.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static volatile long sink;
static int pipefd[2];
static sem_t started;
static pthread_mutex_t out = PTHREAD_MUTEX_INITIALIZER;

/* noinline + noclone keep each function under its own name; using every
 * result after the call keeps the calls from becoming tail jumps. */
__attribute__((noinline, noclone)) long inner(int how)
{
    char c;
    struct timespec ts = {1000000, 0};
    long r;
    switch (how) {
    case 0:
        r = read(0, &c, 1);
        break;
    case 2:
        r = pause();
        break;
    case 3:
        r = nanosleep(&ts, 0);
        break;
    default:
        r = read(pipefd[0], &c, 1);
        break;
    }
    sink += r;
    return r + 1;
}

__attribute__((noinline, noclone)) long middle(int how)
{
    long r = inner(how);
    sink += r;
    return r + 1;
}

__attribute__((noinline, noclone)) long outer(int how)
{
    long r = middle(how);
    sink += r;
    return r + 1;
}

/* The system call inner(how) blocks in. */
static int syscall_nr(int how)
{
    return how == 2 ? SYS_pause : how == 3 ? SYS_clock_nanosleep : SYS_read;
}

static void announce(int how)
{
    pthread_mutex_lock(&out);
    printf("thread %ld %d\n", (long)syscall(SYS_gettid), syscall_nr(how));
    fflush(stdout);
    pthread_mutex_unlock(&out);
}

static void *worker(void *arg)
{
    int how = (int)(long)arg;
    announce(how);
    sem_post(&started);
    sink += outer(how);
    return 0;
}

int main(void)
{
    pthread_t t[4];
    if (pipe(pipefd) || sem_init(&started, 0, 0))
        return 1;
    for (long i = 1; i <= 4; i++)
        if (pthread_create(&t[i - 1], 0, worker, (void *)i))
            return 1;
    for (int i = 0; i < 4; i++)
        sem_wait(&started);
    announce(0);
    printf("ready\n");
    fflush(stdout);
    sink += outer(0);
    return 0;
}
