/* A thread that only reads the clock (through the vDSO, like a service
 * timing its requests), and a main thread waiting on stdin. Prints
 * "ready TID" with the clock thread's id. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static volatile long tid, sink;

static void *clock_reader(void *arg)
{
	(void)arg;
	tid = gettid();
	for (;;) {
		struct timespec ts;
		clock_gettime(CLOCK_MONOTONIC, &ts);
		sink += ts.tv_nsec;
	}
	return NULL;
}

int main(void)
{
	pthread_t t;
	pthread_create(&t, NULL, clock_reader, NULL);
	while (!tid)
		usleep(1000);
	printf("ready %ld\n", tid);
	fflush(stdout);
	char c;
	while (read(0, &c, 1) > 0)
		;
	return 0;
}
