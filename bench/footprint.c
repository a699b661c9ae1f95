/*
 * footprint: many live allocations from many distinct call stacks.
 *
 * Usage: footprint ALLOCS STACKS
 *
 * Prints "ready", waits for a line on stdin (the tracer attaches first),
 * then mallocs ALLOCS 32-byte blocks, block i from call stack number
 * i % STACKS, keeps them all, prints "done" and waits for EOF on stdin.
 *
 * Stack number k is a path of DEPTH calls through four distinct functions
 * chosen by the base-4 digits of k, so 4^DEPTH distinct stacks exist.
 * Built with -fno-omit-frame-pointer; `noipa` keeps the compiler from
 * inlining, cloning or merging the four (identical) functions.
 */
#include <stdio.h>
#include <stdlib.h>

#define DEPTH 7 /* 4^7 = 16384 distinct stacks */
#define NOIPA __attribute__((noipa))

static void **blocks;

NOIPA static void *walk(unsigned code, int depth);

NOIPA static void *leaf(void)
{
    void *p = malloc(32);
    if (!p)
        abort();
    return p;
}

#define VIA(n)                                      \
    NOIPA static void *via##n(unsigned code, int depth) \
    {                                               \
        void *p = walk(code, depth);                \
        __asm__ volatile("" : "+r"(p));             \
        return p;                                   \
    }
VIA(0)
VIA(1)
VIA(2)
VIA(3)

NOIPA static void *walk(unsigned code, int depth)
{
    if (depth == 0)
        return leaf();
    switch ((code >> (2 * (depth - 1))) & 3) {
    case 0:
        return via0(code, depth - 1);
    case 1:
        return via1(code, depth - 1);
    case 2:
        return via2(code, depth - 1);
    default:
        return via3(code, depth - 1);
    }
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: footprint ALLOCS STACKS\n");
        return 2;
    }
    unsigned long allocs = strtoul(argv[1], NULL, 10);
    unsigned long stacks = strtoul(argv[2], NULL, 10);
    if (allocs == 0 || stacks == 0 || stacks > (1ul << (2 * DEPTH))) {
        fprintf(stderr, "footprint: need ALLOCS >= 1 and 1 <= STACKS <= %lu\n",
                1ul << (2 * DEPTH));
        return 2;
    }
    blocks = calloc(allocs, sizeof *blocks);
    if (!blocks)
        return 2;
    char line[64];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        return 0;
    for (unsigned long i = 0; i < allocs; i++)
        blocks[i] = walk((unsigned)(i % stacks), DEPTH);
    printf("done\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin))
        ;
    return 0;
}
