/* suture's runtime as one object: what suture loads into a target. */
#include "shadow.c"
#include "state.c"
