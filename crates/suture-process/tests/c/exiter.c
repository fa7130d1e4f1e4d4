/* Exits (from a worker thread, killing all threads) as soon as a byte
 * arrives on stdin; the main thread just waits in pause(). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static void *worker(void *arg) {
    (void)arg;
    char c;
    if (read(0, &c, 1) >= 0)
        exit(7);
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    printf("ready\n");
    for (;;)
        pause();
}
