"""pyalloc: what an allocation costs a Python program, at a chosen depth.

Usage: python3 pyalloc.py DEPTH

Speaks mallocbench's protocol: prints "ready", then for each line N on
stdin runs N iterations, each creating and dropping one 1,000-byte bytes
object (one malloc and one free: above pymalloc's 512-byte limit) and one
small tuple (pymalloc), DEPTH Python frames below the loop's caller, and
prints "ns_per_pair <wall ns> cpu_ns_per_pair <thread CPU ns>" per iteration.
Comparing two depths under leaktrace gives the cost of each Python frame
the kernel walks per recorded allocation.
"""
import sys
import time


def leaf(n, size=1000):
    # `size` is a variable: b"x" * 1000 would be folded into a constant at
    # compile time and allocate nothing.
    for i in range(n):
        b = b"x" * size
        t = (i, b)
        del t, b


def nest(depth, n):
    if depth <= 1:
        leaf(n)
    else:
        nest(depth - 1, n)


def main():
    depth = int(sys.argv[1])
    print("ready", flush=True)
    for line in sys.stdin:
        n = int(line)
        w0, c0 = time.monotonic_ns(), time.thread_time_ns()
        nest(depth, n)
        c1, w1 = time.thread_time_ns(), time.monotonic_ns()
        print("ns_per_pair %.1f cpu_ns_per_pair %.1f" % ((w1 - w0) / n, (c1 - c0) / n), flush=True)


if __name__ == "__main__":
    main()
