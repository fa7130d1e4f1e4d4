/*
 * suture-bench pause target (issue 6, item 2).
 *
 *   pauses N MODE     N threads; MODE "spin" or "duty"
 *
 * Every thread calls work() (the patched function) and records timestamps
 * (clock_gettime CLOCK_MONOTONIC, vDSO) in a tight loop, keeping its largest
 * gap between consecutive timestamps and every gap of at least 20 us with its
 * start and end (up to a cap per thread; the count goes on past it).
 *
 *   spin  the threads never sleep: with more threads than cores the
 *         scheduler's time slices dominate each thread's gaps, but some thread
 *         of the process always runs, so an interval in which *every* thread
 *         had a gap is one in which the whole process made no progress.
 *   duty  each thread spins for 50 us, then sleeps (timer slack 1 ns) so that
 *         the threads together use about half a core: a thread's gaps are
 *         pauses imposed on it, not time slices. After a sleep the gap counted
 *         is the lateness of the wake-up (from the requested deadline).
 *
 * Commands on stdin, replies on stdout:
 *   r   reset every thread's figures (and resume recording), reply "ok"
 *   f   freeze (stop recording), reply "ok"
 *   d   dump: "t IDX MAXGAP NGAPS START END START END ..." per thread
 *       (ns, relative to the process start), then "end"
 *   x   exit
 * Prints "ready PID work=ADDR sleep_ns=P" once every thread runs.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

__attribute__((noipa)) long work(long x)
{
	return x * 3 + 1;
}

#define THRESH_NS 20000L
#define SPIN_NS 50000L

struct th {
	volatile long max;
	volatile long ngaps;
	long *gs;
	long cap;
	volatile int running;
	char pad[64];
};

static struct th *T;
static int N, spin_mode, cap;
static long sleep_ns, base;
static volatile long gen;
static volatile int frozen;
static volatile long sink;

static inline long now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static inline void gap(struct th *t, long a, long b)
{
	long g = b - a;
	if (frozen)
		return;
	if (g > t->max)
		t->max = g;
	if (g >= THRESH_NS) {
		long k = t->ngaps;
		if (k < t->cap) {
			t->gs[2 * k] = a;
			t->gs[2 * k + 1] = b;
		}
		t->ngaps = k + 1;
	}
}

static void *run(void *arg)
{
	struct th *t = arg;
	long mygen = gen, x = 0;
	prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
	long prev = now();
	t->running = 1;
	for (;;) {
		if (mygen != gen) {
			mygen = gen;
			t->max = 0;
			t->ngaps = 0;
			prev = now();
		}
		if (spin_mode) {
			x = work(x);
			long c = now();
			gap(t, prev, c);
			prev = c;
		} else {
			long end = prev + SPIN_NS, c;
			do {
				x = work(x);
				c = now();
				gap(t, prev, c);
				prev = c;
			} while (c < end);
			struct timespec ts = { 0, sleep_ns };
			long before = now();
			gap(t, prev, before);
			nanosleep(&ts, NULL);
			c = now();
			if (c > before + sleep_ns)
				gap(t, before + sleep_ns, c);
			prev = c;
		}
		sink = x;
	}
	return NULL;
}

static void settle(void)
{
	struct timespec ts = { 0, 2 * sleep_ns + 20000000L };
	while (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	nanosleep(&ts, NULL);
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: pauses N spin|duty\n");
		return 2;
	}
	N = atoi(argv[1]);
	spin_mode = strcmp(argv[2], "spin") == 0;
	/* duty: N * SPIN / (SPIN + sleep) = 0.5 core */
	sleep_ns = 2L * N * SPIN_NS - SPIN_NS;
	if (sleep_ns < SPIN_NS)
		sleep_ns = SPIN_NS;
	cap = 65536 / N;
	if (cap < 1024)
		cap = 1024;
	base = now();
	T = calloc(N, sizeof(*T));
	pthread_attr_t at;
	pthread_attr_init(&at);
	pthread_attr_setstacksize(&at, 256 * 1024);
	for (int i = 0; i < N; i++) {
		T[i].cap = cap;
		T[i].gs = calloc(2 * cap, sizeof(long));
		pthread_t p;
		if (pthread_create(&p, &at, run, &T[i])) {
			perror("pthread_create");
			return 1;
		}
	}
	for (int i = 0; i < N; i++)
		while (!T[i].running)
			usleep(1000);
	printf("ready %d work=%p sleep_ns=%ld base=%ld\n", getpid(), (void *)work, sleep_ns, base);
	fflush(stdout);
	char line[64];
	while (fgets(line, sizeof line, stdin)) {
		switch (line[0]) {
		case 'r':
			frozen = 1;
			gen++;
			settle();
			frozen = 0;
			printf("ok\n");
			break;
		case 'f':
			frozen = 1;
			settle();
			printf("ok\n");
			break;
		case 'd':
			for (int i = 0; i < N; i++) {
				long n = T[i].ngaps;
				printf("t %d %ld %ld", i, T[i].max, n);
				if (n > T[i].cap)
					n = T[i].cap;
				for (long k = 0; k < n; k++)
					printf(" %ld %ld", T[i].gs[2 * k] - base, T[i].gs[2 * k + 1] - base);
				printf("\n");
			}
			printf("end\n");
			break;
		case 'x':
			return 0;
		}
		fflush(stdout);
	}
	return 0;
}
