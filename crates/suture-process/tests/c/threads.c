/* stop_all target: 8 spinning threads, threads blocked in read(pipe),
 * pthread_cond_wait and nanosleep, and a thread that keeps creating and
 * joining short-lived threads. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "commands.h"

#define NSPIN 8
static volatile unsigned long counters[NSPIN];
static volatile unsigned long sleeps, churns;
static int pfd[2];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int woken;
static volatile int started;

static void *spinner(void *arg) {
    long i = (long)arg;
    __sync_fetch_and_add(&started, 1);
    for (;;)
        counters[i]++;
    return NULL;
}

static void *piper(void *arg) {
    (void)arg;
    __sync_fetch_and_add(&started, 1);
    for (;;) {
        char c;
        ssize_t n = read(pfd[0], &c, 1);
        if (n == 1)
            printf("pipe got %c\n", c);
        else
            printf("pipe error %zd %d\n", n, errno);
    }
    return NULL;
}

static void *condwaiter(void *arg) {
    (void)arg;
    __sync_fetch_and_add(&started, 1);
    pthread_mutex_lock(&mu);
    while (!woken)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    printf("cond woke\n");
    return NULL;
}

static void *sleeper(void *arg) {
    (void)arg;
    __sync_fetch_and_add(&started, 1);
    for (;;) {
        struct timespec ts = {0, 1000 * 1000};
        if (nanosleep(&ts, NULL) != 0)
            printf("nanosleep error %d\n", errno);
        sleeps++;
    }
    return NULL;
}

static void *churn_child(void *arg) {
    (void)arg;
    __sync_fetch_and_add(&churns, 1);
    return NULL;
}

static void *churner(void *arg) {
    (void)arg;
    __sync_fetch_and_add(&started, 1);
    for (;;) {
        pthread_t t[2];
        int ok0 = pthread_create(&t[0], NULL, churn_child, NULL) == 0;
        int ok1 = pthread_create(&t[1], NULL, churn_child, NULL) == 0;
        if (ok0)
            pthread_join(t[0], NULL);
        if (ok1)
            pthread_join(t[1], NULL);
    }
    return NULL;
}

static void command(char *line)
{
    if (!strcmp(line, "progress")) {
        unsigned long snap[NSPIN], s0 = sleeps, c0 = churns;
        for (int i = 0; i < NSPIN; i++)
            snap[i] = counters[i];
        int stuck = -1;
        for (int round = 0; round < 10000; round++) {
            stuck = -1;
            for (int i = 0; i < NSPIN; i++)
                if (counters[i] == snap[i])
                    stuck = i;
            if (sleeps == s0)
                stuck = 100;
            if (churns == c0)
                stuck = 200;
            if (stuck < 0)
                break;
            usleep(1000);
        }
        if (stuck < 0)
            printf("progress ok\n");
        else
            printf("progress stuck %d\n", stuck);
    } else if (!strcmp(line, "wake")) {
        if (write(pfd[1], "x", 1) != 1)
            printf("write failed\n");
        pthread_mutex_lock(&mu);
        woken = 1;
        pthread_cond_signal(&cv);
        pthread_mutex_unlock(&mu);
    }
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (pipe(pfd))
        return 1;
    pthread_t t;
    for (long i = 0; i < NSPIN; i++)
        pthread_create(&t, NULL, spinner, (void *)i);
    pthread_create(&t, NULL, piper, NULL);
    pthread_create(&t, NULL, condwaiter, NULL);
    pthread_create(&t, NULL, sleeper, NULL);
    pthread_create(&t, NULL, churner, NULL);
    while (started < NSPIN + 4)
        usleep(100);
    printf("counters %p\n", (void *)counters);
    printf("ready\n");
    return serve_commands(command);
}
