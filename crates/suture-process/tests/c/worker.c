/* Hijack target: main thread blocked in read(stdin) serving commands, a
 * ticker thread writing "tick N" to stderr every 2 ms, and a sleeper thread
 * looping in nanosleep. Any failed read/nanosleep is reported. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static volatile long sleeps, sleep_errors;
static volatile long sleeper_tid;

static void *ticker(void *arg) {
    (void)arg;
    for (long n = 1;; n++) {
        fprintf(stderr, "tick %ld\n", n);
        struct timespec ts = {0, 2 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

static void *sleeper(void *arg) {
    (void)arg;
    sleeper_tid = syscall(SYS_gettid);
    for (;;) {
        struct timespec ts = {0, 300 * 1000 * 1000};
        if (nanosleep(&ts, NULL) != 0) {
            sleep_errors++;
            printf("nanosleep error %d\n", errno);
        }
        sleeps++;
    }
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t a, b;
    pthread_create(&a, NULL, ticker, NULL);
    pthread_create(&b, NULL, sleeper, NULL);
    while (!sleeper_tid)
        usleep(100);
    printf("sleeper %ld\n", sleeper_tid);
    printf("ready\n");
    char buf[4096];
    for (;;) {
        ssize_t n = read(0, buf, sizeof buf - 1);
        if (n < 0) {
            printf("read error %d\n", errno);
            return 1;
        }
        if (n == 0)
            return 0;
        buf[n] = 0;
        for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
            if (!strncmp(line, "echo ", 5)) {
                printf("echo %s\n", line + 5);
            } else if (!strcmp(line, "waitsleep")) {
                long s0 = sleeps;
                for (int i = 0; i < 10000 && sleeps < s0 + 2; i++)
                    usleep(1000);
                printf("status sleeps %ld errors %ld\n", sleeps - s0, sleep_errors);
            }
        }
    }
}
