/* Threads that block SIGTRAP: "keeper" for good, asleep in read(); "brief"
 * while it spins for 300 ms, then it unblocks it and sleeps. Prints their
 * ids, then "ready" (the brief one is still spinning then: it signals the
 * main thread only once it has blocked SIGTRAP). */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int never[2], started[2];

static void block_trap(int how)
{
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, SIGTRAP);
	pthread_sigmask(how, &s, NULL);
}

/* Blocks SIGTRAP, prints "WHO TID", tells main it has started. */
static int announce(const char *who)
{
	block_trap(SIG_BLOCK);
	printf("%s %ld\n", who, (long)syscall(SYS_gettid));
	fflush(stdout);
	return write(started[1], who, 1) == 1;
}

static void *keeper(void *arg)
{
	char c;
	(void)arg;
	if (!announce("keeper"))
		return NULL;
	while (read(never[0], &c, 1) > 0)
		;
	return NULL;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *brief(void *arg)
{
	char c;
	(void)arg;
	double end = now() + 0.3;
	if (!announce("brief"))
		return NULL;
	while (now() < end)
		;
	block_trap(SIG_UNBLOCK);
	while (read(never[0], &c, 1) > 0)
		;
	return NULL;
}

int main(void)
{
	pthread_t a, b;
	char c;
	if (pipe(never) || pipe(started))
		return 1;
	pthread_create(&a, NULL, keeper, NULL);
	if (read(started[0], &c, 1) != 1)
		return 1;
	pthread_create(&b, NULL, brief, NULL);
	if (read(started[0], &c, 1) != 1)
		return 1;
	printf("ready\n");
	fflush(stdout);
	while (read(0, &c, 1) > 0)
		;
	return 0;
}
