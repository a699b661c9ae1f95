#!/usr/bin/python3
"""floor: the cheapest tracer that records every allocation.

Usage: floor.py PID FREE_OFFSET

Attaches one empty eBPF program (through bcc) at the three points a
record-every-allocation tracer needs: malloc entry, malloc return and
free+FREE_OFFSET in the libc of PID. What the target pays under it is the
cost of the probe traps alone, the floor under leaktrace. Prints
"floor: attached" once every probe is in place; Ctrl-C (SIGINT) detaches.
"""
import signal
import sys

from bcc import BPF

pid = int(sys.argv[1])
free_offset = int(sys.argv[2])
# Not named `nop`: the kernel headers bcc includes define a nop() macro.
b = BPF(text="int floor_probe(void *ctx) { return 0; }")
b.attach_uprobe(name="c", sym="malloc", fn_name="floor_probe", pid=pid)
b.attach_uretprobe(name="c", sym="malloc", fn_name="floor_probe", pid=pid)
b.attach_uprobe(name="c", sym="free", sym_off=free_offset, fn_name="floor_probe", pid=pid)
print("floor: attached", flush=True)
try:
    signal.pause()
except KeyboardInterrupt:
    pass
