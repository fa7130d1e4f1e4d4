#!/bin/sh
# Build and run the suture runtime tests. Exit status 0 on success.
#
#   runtime/test/run.sh            (STRESS_SECONDS=N to change the stress time)
#
# 1. builds runtime/shadow.c exactly as suture will (a relocatable object)
#    and checks it has no constructors, TLS or IFUNC, listing what it needs;
# 2. runs the API test and the 8-thread stress test (-O2 -pthread), the
#    stress test also with 4 buckets (long chains shared by all keys);
# 3. repeats 2 under ThreadSanitizer and AddressSanitizer (LeakSanitizer
#    included) when the compiler supports them.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
rt="$here/.."
out=$(mktemp -d "${TMPDIR:-/tmp}/suture-runtime-test.XXXXXX")
trap 'rm -rf "$out"' EXIT
CC=${CC:-cc}
export STRESS_SECONDS="${STRESS_SECONDS:-3}"
WARN="-Wall -Wextra -Werror -I$rt/../include"

echo "== build the runtime object as suture loads it"
$CC -c -O2 -fPIC -fno-common -ffunction-sections -fdata-sections \
	-fasynchronous-unwind-tables $WARN -o "$out/shadow.o" "$rt/shadow.c"
if readelf -SW "$out/shadow.o" | grep -Eq '\.(init_array|fini_array|ctors|dtors|tbss|tdata|preinit_array)'; then
	echo "FAIL: shadow.o has init/fini or TLS sections" >&2
	exit 1
fi
if readelf -sW "$out/shadow.o" | grep -Eq 'IFUNC|TLS'; then
	echo "FAIL: shadow.o has IFUNC or TLS symbols" >&2
	exit 1
fi
echo "undefined symbols (suture must resolve them in the target):"
nm -u "$out/shadow.o" | sed 's/^ */  /'

# run_suite NAME EXTRA_CFLAGS...: build both tests with these flags and run.
run_suite() {
	name=$1
	shift
	echo "== $name: API test"
	$CC -O2 -g -pthread $WARN "$@" -o "$out/api-$name" "$here/test_api.c" "$rt/shadow.c"
	"$out/api-$name" >"$out/api-$name.log"
	tail -n 1 "$out/api-$name.log"
	for buckets in 1024 4; do
		echo "== $name: stress test, $buckets buckets"
		$CC -O2 -g -pthread $WARN "$@" -DSUTURE_SHADOW_BUCKETS=$buckets \
			-Wl,--wrap=calloc -Wl,--wrap=free \
			-o "$out/stress-$name-$buckets" "$here/test_stress.c" "$rt/shadow.c"
		"$out/stress-$name-$buckets"
	done
}

# Can the compiler build and run a program with this sanitizer?
have_sanitizer() {
	printf 'int main(void){return 0;}\n' >"$out/probe.c"
	$CC -fsanitize="$1" -o "$out/probe" "$out/probe.c" 2>/dev/null && "$out/probe" 2>/dev/null
}

run_suite plain

if have_sanitizer thread; then
	# halt_on_error: any report fails the run.
	TSAN_OPTIONS="halt_on_error=1 exitcode=66${TSAN_OPTIONS:+ $TSAN_OPTIONS}" \
		run_suite tsan -fsanitize=thread
else
	echo "== tsan: not available with $CC, skipped"
fi

if have_sanitizer address; then
	ASAN_OPTIONS="detect_leaks=1 halt_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
		run_suite asan -fsanitize=address -fno-omit-frame-pointer
else
	echo "== asan: not available with $CC, skipped"
fi

echo "== all runtime tests passed"
