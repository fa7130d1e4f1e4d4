/* Patches triv, slow50 and holder with code identical to the old: only the
 * redirection is measured. NAME is set per round by the benchmark. */
#include <suture.h>
#include <unistd.h>
#ifndef NAME
#define NAME "bench-same"
#endif
static long triv_same(long x)
{
	return x + 1;
}
static long slow50_same(long x)
{
	for (int i = 0; i < 40; i++) {
		x = x * 2654435761L + i;
		__asm__ volatile("" : "+r"(x));
	}
	return x;
}
static int holder_same(int fd)
{
	char c;
	return (int)read(fd, &c, 1);
}
static struct suture_func funcs[] = {
	{ .old_name = "triv", .new_func = triv_same },
	{ .old_name = "slow50", .new_func = slow50_same },
	{ .old_name = "holder", .new_func = holder_same },
	{ }
};
static struct suture_object objs[] = { { .name = NULL, .funcs = funcs }, { } };
SUTURE_PATCH(p) = { .name = NAME, .objs = objs };
