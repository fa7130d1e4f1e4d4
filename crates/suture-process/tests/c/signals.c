/* Signal accounting target: handlers count SIGUSR1 and SIGRTMIN; a raiser
 * thread raises SIGUSR2 at itself in a loop and counts sends and receipts
 * (which must match exactly); a few spinners keep CPUs busy. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "commands.h"

static volatile sig_atomic_t usr1, rt;
static volatile long sent, received;
static volatile int stop_raiser;
static volatile long raiser_tid;
static volatile unsigned long spin[3];

static void on_usr1(int s) { (void)s; usr1++; }
static void on_rt(int s) { (void)s; rt++; }
static void on_usr2(int s) { (void)s; received++; }
static volatile sig_atomic_t traps, trap_code, trap_pid;
static void on_trap(int s, siginfo_t *info, void *ctx) {
    (void)s;
    (void)ctx;
    traps++;
    trap_code = info->si_code;
    trap_pid = info->si_pid;
}

static void *spinner(void *arg) {
    long i = (long)arg;
    for (;;)
        spin[i]++;
    return NULL;
}

static void *raiser(void *arg) {
    (void)arg;
    raiser_tid = syscall(SYS_gettid);
    while (!stop_raiser) {
        sent++;
        raise(SIGUSR2);
    }
    return NULL;
}

static void handle(int sig, void (*fn)(int)) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, NULL);
}

/* The raiser thread, joined by the "check" command. */
static pthread_t r;

static void command(char *line)
{
    int a, b;
    if (sscanf(line, "waitcounts %d %d", &a, &b) == 2) {
        for (int i = 0; i < 10000 && (usr1 < a || rt < b); i++)
            usleep(1000);
        /* Give a duplicate delivery, if any, time to show up. */
        usleep(200 * 1000);
        printf("counts usr1 %d rt %d\n", (int)usr1, (int)rt);
    } else if (!strcmp(line, "traps")) {
        for (int i = 0; i < 10000 && !traps; i++)
            usleep(1000);
        usleep(200 * 1000);
        printf("traps %d code %d pid %d\n", (int)traps, (int)trap_code, (int)trap_pid);
    } else if (!strcmp(line, "check")) {
        stop_raiser = 1;
        pthread_join(r, NULL);
        printf("raised %ld received %ld\n", sent, received);
    }
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    handle(SIGUSR1, on_usr1);
    handle(SIGUSR2, on_usr2);
    handle(SIGRTMIN, on_rt);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_trap;
    sa.sa_flags = SA_RESTART | SA_SIGINFO;
    sigaction(SIGTRAP, &sa, NULL);
    pthread_t t;
    for (long i = 0; i < 3; i++)
        pthread_create(&t, NULL, spinner, (void *)i);
    pthread_create(&r, NULL, raiser, NULL);
    while (!raiser_tid)
        usleep(100);
    printf("raiser %ld\n", raiser_tid);
    printf("ready\n");
    return serve_commands(command);
}
