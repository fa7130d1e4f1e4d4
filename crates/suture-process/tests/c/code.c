/* write_mem target: a function whose code the test overwrites, and a
 * read-only string. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "commands.h"

__attribute__((noinline)) int get_value(void) { return 1; }
int (*volatile fp)(void) = get_value;
static const char message[] = "original";
const char *volatile msgp = message;

static void command(char *line)
{
    if (!strcmp(line, "call"))
        printf("value %d\n", fp());
    else if (!strcmp(line, "msg"))
        printf("message %s\n", msgp);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("fn %p\n", (void *)get_value);
    printf("msg %p\n", (void *)message);
    printf("ready\n");
    return serve_commands(command);
}
