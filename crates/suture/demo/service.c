/*
 * The suture demo service: a small multi-threaded shop on 127.0.0.1.
 * Each connection sends one line "buy QUANTITY" and gets one line back.
 * Its bug: parse_quantity() accepts negative quantities, so a customer can
 * be paid instead of charged. demo/fix.c replaces it live.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define WORKERS 4
#define PRICE 3

static long served;

/* Returns the quantity, or -1 when the request is malformed. */
__attribute__((noinline)) long parse_quantity(const char *s)
{
	char *end;
	long q = strtol(s, &end, 10);
	if (end == s)
		return -1;
	return q; /* BUG: negative quantities get through */
}

static void handle(int fd)
{
	char buf[128], reply[160];
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	if (n <= 0)
		return;
	buf[n] = 0;
	buf[strcspn(buf, "\r\n")] = 0;
	if (strncmp(buf, "buy ", 4) != 0) {
		snprintf(reply, sizeof(reply), "error: say 'buy N'\n");
	} else {
		long q = parse_quantity(buf + 4);
		if (q == -1)
			snprintf(reply, sizeof(reply), "error: invalid quantity\n");
		else
			snprintf(reply, sizeof(reply), "ok: %ld item(s), charged %ld coins\n", q, q * PRICE);
	}
	__atomic_add_fetch(&served, 1, __ATOMIC_RELAXED);
	if (write(fd, reply, strlen(reply)) < 0)
		return;
}

static void *worker(void *arg)
{
	int lfd = *(int *)arg;
	for (;;) {
		int fd = accept(lfd, NULL, NULL);
		if (fd < 0)
			continue;
		handle(fd);
		close(fd);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	/* Optional argument: the port (default: any free one). */
	int port = argc > 1 ? atoi(argv[1]) : 0, one = 1;
	int lfd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = { .sin_family = AF_INET,
				 .sin_port = htons(port),
				 .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(a);
	if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 || bind(lfd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(lfd, 256) < 0 ||
	    getsockname(lfd, (struct sockaddr *)&a, &len) < 0) {
		perror("demo service");
		return 1;
	}
	pthread_t t[WORKERS];
	for (int i = 0; i < WORKERS; i++)
		pthread_create(&t[i], NULL, worker, &lfd);
	printf("%d\n", ntohs(a.sin_port));
	fflush(stdout);
	for (;;)
		pause();
}
