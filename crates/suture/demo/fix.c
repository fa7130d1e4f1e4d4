/* The demo's live patch: refuse quantities that are not positive. */
#include <stdlib.h>
#include <suture.h>

static long fixed_parse_quantity(const char *s)
{
	char *end;
	long q = strtol(s, &end, 10);
	if (end == s || q <= 0 || q > 1000)
		return -1;
	return q;
}

static struct suture_func funcs[] = {
	{ .old_name = "parse_quantity", .new_func = fixed_parse_quantity },
	{ }
};

static struct suture_object objs[] = {
	{ .name = NULL, .funcs = funcs },
	{ }
};

SUTURE_PATCH(fix) = { .name = "fix-negative-quantity", .objs = objs };
