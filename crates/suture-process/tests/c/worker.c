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

#include "commands.h"

static volatile long sleeps, sleep_errors;
static volatile long sleeper_tid;

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

static void command(char *line)
{
    if (!strncmp(line, "echo ", 5)) {
        printf("echo %s\n", line + 5);
    } else if (!strcmp(line, "waitsleep")) {
        long s0 = sleeps;
        for (int i = 0; i < 10000 && sleeps < s0 + 2; i++)
            usleep(1000);
        printf("status sleeps %ld errors %ld\n", sleeps - s0, sleep_errors);
    }
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
    return serve_commands(command);
}
