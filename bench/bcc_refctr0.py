#!/usr/bin/python3
"""bcc_refctr0: run a bcc Python tool with uprobes attached with ref_ctr_offset 0.

Usage: bcc_refctr0.py TOOL [ARGS...]   (e.g. /usr/sbin/memleak-bpfcc -p PID)

bcc's Python binding declares bpf_attach_uprobe() with six arguments while
libbcc (0.17 and later) takes seven; the missing ref_ctr_offset is whatever
the register holds (iovisor/bcc#5236, fix proposed in #5269). The kernel
accepts any value while no other tracer probes the same address, but then
every other tracer attaching there without that same value fails with
EINVAL ("ref_ctr_offset mismatch" in dmesg), and the tool itself fails if
another tracer (a concurrent leaktrace, for instance) was there first.
This shim passes 0, which is what a plain uprobe means. It changes nothing
the probes do, so the tool's cost is the same.
"""
import ctypes as ct
import runpy
import sys

from bcc import libbcc

_attach = libbcc.lib.bpf_attach_uprobe
_attach.restype = ct.c_int
_attach.argtypes = [ct.c_int, ct.c_int, ct.c_char_p, ct.c_char_p,
                    ct.c_ulonglong, ct.c_int, ct.c_uint32]


def _attach_refctr0(progfd, attach_type, ev_name, path, addr, pid):
    return _attach(progfd, attach_type, ev_name, path, addr, pid, 0)


# bcc/__init__.py calls lib.bpf_attach_uprobe on this same CDLL object.
libbcc.lib.bpf_attach_uprobe = _attach_refctr0

if len(sys.argv) < 2:
    sys.exit("usage: bcc_refctr0.py TOOL [ARGS...]")
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
