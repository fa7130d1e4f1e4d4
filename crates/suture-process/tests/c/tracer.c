/* A stand-in debugger: PTRACE_SEIZEs the given pid (its main thread only)
 * and holds it until stdin closes. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/ptrace.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2)
        return 2;
    pid_t pid = atoi(argv[1]);
    if (ptrace(PTRACE_SEIZE, pid, 0, 0) != 0) {
        perror("PTRACE_SEIZE");
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    char c;
    while (read(0, &c, 1) > 0) {
    }
    return 0;
}
