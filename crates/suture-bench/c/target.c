/*
 * suture-bench target: times its own calls.
 *
 *   triv(x)    a trivial function (x + 1)
 *   slow50(x)  about 50 ns of dependent multiplies
 *   holder(fd) blocks in read(fd) (a thread sits in it to hold a transition open)
 *   other(x)   the function the replace patch changes
 *
 * Threads: main (commands on stdin, measures in its own tight loops) and
 * "holder", which calls holder(pipe) in a loop: it is always inside holder(),
 * blocked in read(), until a byte is written to the pipe ("w").
 *
 * Commands on stdin (one per line), replies on stdout:
 *   m BATCHES CALLS  for each batch: CALLS calls of triv, then CALLS/25 calls of
 *                    slow50, each batch timed with clock_gettime (vDSO, no system
 *                    call); replies "triv NS NS ..." and "slow NS NS ..." (ns/call)
 *                    "jmp1 NS ..." and "jmp2 NS ..." (the references triv_jmp1,
 *                    triv_jmp2), "tbody NS ..." and "stwin NS ..." (the never
 *                    patched twins triv_body and slow50_twin, timed in the same
 *                    batches), "tptr NS ..." and "bptr NS ..." (triv and
 *                    triv_body called through function pointers) and
 *                    "insn TRIV SLOW" (user instructions per call from
 *                    perf_event_open, or "insn - -" when unavailable)
 *   r N              run N calls of each (for callgrind), reply "ok"
 *   w                write one byte to the holder's pipe, reply "ok"
 *   s                let the "step" thread make one call of each, reply "ok"
 *   x                exit
 * Prints "ready PID triv=ADDR slow50=ADDR holder=ADDR step=TID" once the
 * holder and step threads are blocked.
 */
#define _GNU_SOURCE
#include <linux/perf_event.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

__attribute__((noipa)) long triv(long x)
{
	return x + 1;
}

/* References compiled into the target, never patched: the same trivial body
 * reached through one direct jmp (what suture writes at a patched entry) and
 * through two (a short jmp, then a jmp rel32: the shape of a redirect through
 * compiler padding, as libpulp does). */
__attribute__((noipa, used)) long triv_body(long x)
{
	return x + 1;
}
__attribute__((naked, noinline)) long triv_jmp1(long x)
{
	__asm__("jmp triv_body\n");
}
__attribute__((naked, noinline)) long triv_jmp2(long x)
{
	__asm__("jmp 1f\n .skip 14, 0x90\n 1: jmp triv_body\n");
}

__attribute__((noipa)) long slow50(long x)
{
	for (int i = 0; i < 40; i++) {
		x = x * 2654435761L + i;
		__asm__ volatile("" : "+r"(x));
	}
	return x;
}

/* slow50's twin, never patched: timed in the same batches as slow50. */
__attribute__((noipa)) long slow50_twin(long x)
{
	for (int i = 0; i < 40; i++) {
		x = x * 2654435761L + i;
		__asm__ volatile("" : "+r"(x));
	}
	return x;
}

__attribute__((noipa)) int holder(int fd)
{
	char c;
	return (int)read(fd, &c, 1);
}

__attribute__((noipa)) long other(long x)
{
	return x * 3;
}

static int pipe_fd[2], step_fd[2];
static volatile long sink;
static volatile int step_tid;

/* The "step" thread makes one call of triv and one of slow50 per byte on its
 * pipe ("s"): the benchmark single-steps it with ptrace to count the
 * instructions of one call exactly, in every mode. */
static void *step_thread(void *arg)
{
	char c;
	(void)arg;
	step_tid = (int)syscall(SYS_gettid);
	for (;;) {
		if (read(step_fd[0], &c, 1) != 1)
			return NULL;
		sink = triv(sink);
		sink = slow50(sink);
	}
}

static void *holder_thread(void *arg)
{
	(void)arg;
	for (;;)
		if (holder(pipe_fd[0]) < 0)
			return NULL;
}

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static __attribute__((noinline)) void run_triv(long n)
{
	long acc = 0;
	for (long i = 0; i < n; i++)
		acc = triv(acc);
	sink = acc;
}

static __attribute__((noinline)) void run_body(long n)
{
	long acc = 0;
	for (long i = 0; i < n; i++)
		acc = triv_body(acc);
	sink = acc;
}

static __attribute__((noinline)) void run_twin(long n)
{
	long acc = 1;
	for (long i = 0; i < n; i++)
		acc = slow50_twin(acc);
	sink = acc;
}

static __attribute__((noinline)) void run_jmp1(long n)
{
	long acc = 0;
	for (long i = 0; i < n; i++)
		acc = triv_jmp1(acc);
	sink = acc;
}

static __attribute__((noinline)) void run_jmp2(long n)
{
	long acc = 0;
	for (long i = 0; i < n; i++)
		acc = triv_jmp2(acc);
	sink = acc;
}

/* Calls through a function pointer: a caller suture cannot rewrite, which
 * always reaches the entry (and its jump once patched). The twin calls
 * triv_body through a pointer the same way. */
static long (*volatile triv_ptr)(long) = triv;
static long (*volatile body_ptr)(long) = triv_body;

static __attribute__((noinline)) void run_tptr(long n)
{
	long (*f)(long) = triv_ptr;
	long acc = 0;
	for (long i = 0; i < n; i++)
		acc = f(acc);
	sink = acc;
}

static __attribute__((noinline)) void run_bptr(long n)
{
	long (*f)(long) = body_ptr;
	long acc = 0;
	for (long i = 0; i < n; i++)
		acc = f(acc);
	sink = acc;
}

static __attribute__((noinline)) void run_slow(long n)
{
	long acc = 1;
	for (long i = 0; i < n; i++)
		acc = slow50(acc);
	sink = acc;
}

static int perf_fd = -2;

static int insn_counter(void)
{
	if (perf_fd != -2)
		return perf_fd;
	struct perf_event_attr a;
	memset(&a, 0, sizeof(a));
	a.size = sizeof(a);
	a.type = PERF_TYPE_HARDWARE;
	a.config = PERF_COUNT_HW_INSTRUCTIONS;
	a.disabled = 1;
	a.exclude_kernel = 1;
	a.exclude_hv = 1;
	perf_fd = (int)syscall(SYS_perf_event_open, &a, 0, -1, -1, 0);
	return perf_fd;
}

/* Instructions per call: (count(2n calls) - count(n calls)) / n, so the
 * loop's setup cancels out; the loop's own instructions per iteration stay. */
static double insn_per_call(void (*run)(long), long n)
{
	int fd = insn_counter();
	if (fd < 0)
		return -1;
	long long c[2];
	for (int k = 0; k < 2; k++) {
		ioctl(fd, PERF_EVENT_IOC_RESET, 0);
		ioctl(fd, PERF_EVENT_IOC_ENABLE, 0);
		run(n * (k + 1));
		ioctl(fd, PERF_EVENT_IOC_DISABLE, 0);
		if (read(fd, &c[k], sizeof(c[k])) != sizeof(c[k]))
			return -1;
	}
	return (double)(c[1] - c[0]) / n;
}

int main(void)
{
	char line[256];
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (pipe(pipe_fd) || pipe(step_fd))
		return 1;
	pthread_t st;
	pthread_create(&st, NULL, step_thread, NULL);
	pthread_setname_np(st, "step");
	pthread_t t;
	pthread_create(&t, NULL, holder_thread, NULL);
	pthread_setname_np(t, "holder");
	usleep(50000);
	printf("ready %d triv=%p slow50=%p holder=%p step=%d\n", getpid(), (void *)triv, (void *)slow50, (void *)holder, step_tid);
	while (fgets(line, sizeof(line), stdin)) {
		long b, n;
		if (sscanf(line, "m %ld %ld", &b, &n) == 2) {
			double tr[b], sl[b], j1[b], j2[b], tb[b], tw[b], tp[b], bp[b];
			long ns = n / 25 > 0 ? n / 25 : 1;
			run_triv(n / 10); /* warm-up (and the first call's switch) */
			run_slow(ns / 10);
			for (long i = 0; i < b; i++) {
				double t0 = now_ns();
				run_triv(n);
				double t1 = now_ns();
				run_slow(ns);
				double t2 = now_ns();
				run_jmp1(n);
				double t3 = now_ns();
				run_jmp2(n);
				double t4 = now_ns();
				run_body(n);
				double t5 = now_ns();
				run_twin(ns);
				double t6 = now_ns();
				run_tptr(n);
				double t7 = now_ns();
				run_bptr(n);
				double t8 = now_ns();
				tp[i] = (t7 - t6) / n;
				bp[i] = (t8 - t7) / n;
				tb[i] = (t5 - t4) / n;
				tw[i] = (t6 - t5) / ns;
				tr[i] = (t1 - t0) / n;
				sl[i] = (t2 - t1) / ns;
				j1[i] = (t3 - t2) / n;
				j2[i] = (t4 - t3) / n;
			}
			printf("triv");
			for (long i = 0; i < b; i++)
				printf(" %.4f", tr[i]);
			printf("\nslow");
			for (long i = 0; i < b; i++)
				printf(" %.4f", sl[i]);
			printf("\njmp1");
			for (long i = 0; i < b; i++)
				printf(" %.4f", j1[i]);
			printf("\njmp2");
			for (long i = 0; i < b; i++)
				printf(" %.4f", j2[i]);
			printf("\ntbody");
			for (long i = 0; i < b; i++)
				printf(" %.4f", tb[i]);
			printf("\nstwin");
			for (long i = 0; i < b; i++)
				printf(" %.4f", tw[i]);
			printf("\ntptr");
			for (long i = 0; i < b; i++)
				printf(" %.4f", tp[i]);
			printf("\nbptr");
			for (long i = 0; i < b; i++)
				printf(" %.4f", bp[i]);
			double it = insn_per_call(run_triv, 100000), is = insn_per_call(run_slow, 10000);
			if (it < 0)
				printf("\ninsn - -\n");
			else
				printf("\ninsn %.3f %.3f\n", it, is);
		} else if (sscanf(line, "r %ld", &n) == 1) {
			run_triv(n);
			run_slow(n);
			printf("ok\n");
		} else if (line[0] == 'w') {
			if (write(pipe_fd[1], "w", 1) != 1)
				return 1;
			printf("ok\n");
		} else if (line[0] == 's') {
			if (write(step_fd[1], "s", 1) != 1)
				return 1;
			printf("ok\n");
		} else if (line[0] == 'x') {
			exit(0);
		}
	}
	return 0;
}
