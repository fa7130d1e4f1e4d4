/* Per-thread tracer target. Threads: a looper calling getpid in a loop and
 * counting; a reader blocked in read() on a pipe; a sleeper looping on
 * nanosleep; a signal thread counting SIGUSR1 in a handler; an execer that
 * execs this program again when told; a vforker that sits in vfork() (in
 * uninterruptible sleep) until told. The test reads the counters in
 * `shared` (printed address, 8-byte fields) through /proc/PID/mem.
 * "main-exit" ends the main thread (the others live on).
 * Run as `tracee execed`, it prints "execed" and answers "ping". */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "commands.h"

static volatile struct {
    unsigned long loops;        /* 0: looper iterations */
    unsigned long sleeps;       /* 1: sleeper iterations */
    unsigned long sleep_errors; /* 2: failed nanosleeps */
    unsigned long usr1;         /* 3: SIGUSR1 handled by the signal thread */
    unsigned long sig_loops;    /* 4: signal thread iterations */
    unsigned long pipe_reads;   /* 5: reads returned */
    long pipe_len;              /* 6: result of the last read */
    long pipe_errno;            /* 7: its errno */
    long spawned;               /* 8: tid of the thread the looper created */
    char pipe_data[64];         /* 9..: data of the last read */
} shared;

static volatile int stop_looper, spawn_req;
static int pfd[2], xfd[2], vfd[2], vchild[2];
static volatile long tids[6];

static long gettid_(void) { return syscall(SYS_gettid); }

static void *idler(void *arg) {
    (void)arg;
    shared.spawned = gettid_();
    for (;;)
        pause();
    return NULL;
}

static void *looper(void *arg) {
    (void)arg;
    tids[0] = gettid_();
    while (!stop_looper) {
        syscall(SYS_getpid);
        shared.loops++;
        if (spawn_req) {
            spawn_req = 0;
            pthread_t t;
            pthread_create(&t, NULL, idler, NULL);
        }
    }
    return NULL;
}

static void *reader(void *arg) {
    (void)arg;
    tids[1] = gettid_();
    for (;;) {
        char buf[64];
        ssize_t n = read(pfd[0], buf, sizeof buf);
        shared.pipe_errno = n < 0 ? errno : 0;
        if (n > 0)
            memcpy((char *)shared.pipe_data, buf, n);
        shared.pipe_len = n;
        shared.pipe_reads++;
        if (n > 0)
            printf("pipe got %.*s\n", (int)n, buf);
        else
            printf("pipe error %zd %d\n", n, errno);
    }
    return NULL;
}

static void *sleeper(void *arg) {
    (void)arg;
    tids[2] = gettid_();
    for (;;) {
        struct timespec ts = {0, 1000 * 1000};
        if (nanosleep(&ts, NULL) != 0)
            shared.sleep_errors++;
        shared.sleeps++;
    }
    return NULL;
}

static void on_usr1(int s) {
    (void)s;
    shared.usr1++;
}

static void *signalled(void *arg) {
    (void)arg;
    tids[3] = gettid_();
    for (;;) {
        for (volatile int i = 0; i < 1000; i++) {
        }
        syscall(SYS_getppid);
        struct timespec ts = {0, 20 * 1000};
        nanosleep(&ts, NULL);
        shared.sig_loops++;
    }
    return NULL;
}

static void *execer(void *arg) {
    (void)arg;
    tids[4] = gettid_();
    char c;
    if (read(xfd[0], &c, 1) == 1)
        execl("/proc/self/exe", "tracee", "execed", (char *)NULL);
    printf("exec failed %d\n", errno);
    return NULL;
}

static void *vforker(void *arg) {
    (void)arg;
    tids[5] = gettid_();
    char c;
    if (read(vfd[0], &c, 1) != 1)
        return NULL;
    pid_t child = vfork();
    if (child == 0) {
        /* Keeps the parent thread in vfork() until released. */
        if (read(vchild[0], &c, 1) < 0)
            _exit(1);
        _exit(0);
    }
    printf("vfork done %d\n", child > 0);
    return NULL;
}

static void command(char *line) {
    if (!strncmp(line, "write ", 6)) {
        if (write(pfd[1], line + 6, strlen(line + 6)) < 0)
            printf("write failed\n");
    } else if (!strcmp(line, "quit-looper")) {
        stop_looper = 1;
    } else if (!strcmp(line, "spawn")) {
        spawn_req = 1;
    } else if (!strcmp(line, "exec")) {
        if (write(xfd[1], "x", 1) != 1)
            printf("write failed\n");
    } else if (!strcmp(line, "vfork")) {
        if (write(vfd[1], "v", 1) != 1)
            printf("write failed\n");
    } else if (!strcmp(line, "vfork-release")) {
        if (write(vchild[1], "v", 1) != 1)
            printf("write failed\n");
    } else if (!strcmp(line, "ping")) {
        printf("pong\n");
    } else if (!strcmp(line, "main-exit")) {
        pthread_exit(NULL);
    }
}

static void exec_command(char *line) {
    if (!strcmp(line, "ping"))
        printf("pong execed\n");
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc > 1 && !strcmp(argv[1], "execed")) {
        printf("execed\n");
        return serve_commands(exec_command);
    }
    if (pipe(pfd) || pipe(xfd) || pipe(vfd) || pipe(vchild))
        return 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    void *(*fns[6])(void *) = {looper, reader, sleeper, signalled, execer, vforker};
    pthread_t t;
    for (int i = 0; i < 6; i++)
        pthread_create(&t, NULL, fns[i], NULL);
    for (int i = 0; i < 6; i++)
        while (!tids[i])
            usleep(100);
    printf("looper %ld\nreader %ld\nsleeper %ld\nsignalled %ld\nexecer %ld\nvforker %ld\n",
           tids[0], tids[1], tids[2], tids[3], tids[4], tids[5]);
    printf("shared %p\n", (void *)&shared);
    printf("ready\n");
    return serve_commands(command);
}
