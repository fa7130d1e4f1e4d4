/*
 * Shared by the test programs (each includes it): the stdin command loop
 * and a ticker thread.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/*
 * Reads commands from stdin and passes each line to handle(). Returns the
 * exit status: 0 at end of input, 1 after a failed read, reported as
 * "read error ERRNO" so a test notices a blocking read that suture broke.
 */
static int serve_commands(void (*handle)(char *line))
{
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
        for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n"))
            handle(line);
    }
}

/* Writes "tick N" to stderr every 2 ms. */
__attribute__((unused)) static void *ticker(void *arg)
{
    (void)arg;
    for (long n = 1;; n++) {
        fprintf(stderr, "tick %ld\n", n);
        struct timespec ts = {0, 2 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}
