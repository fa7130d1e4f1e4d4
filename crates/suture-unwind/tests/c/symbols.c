/* Functions with known names for the symbolizer tests; one has a C++
 * mangled name (a valid C identifier too). */
volatile int sink;

__attribute__((noinline)) int marker(int x)
{
    sink += x;
    return x * 3 + 1;
}

__attribute__((noinline)) int _ZN6suture4test7mangledEv(void)
{
    return marker(2) + 1;
}

int main(void)
{
    return marker(1) + _ZN6suture4test7mangledEv();
}
