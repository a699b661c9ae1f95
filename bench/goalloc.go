// goalloc: what an allocation costs a Go program, at a chosen profiling
// rate.
//
// Usage: goalloc RATE
//
// Sets runtime.MemProfileRate to RATE (bytes per sample on average; the
// default is 524288) and speaks mallocbench's protocol: prints "ready",
// then for each line N on stdin makes N 1,024-byte objects, each replacing
// one of 4,096 kept (so they die young and the GC frees them), and prints
// "ns_per_pair <wall ns> cpu_ns_per_pair <process CPU ns>" per object.
// Process CPU includes the collector's threads. At RATE 4096 about one
// object in four is sampled: the runtime charges it to a profile bucket
// (runtime.setprofilebucket) and later frees it (runtime.mProf_Free),
// the two functions leaktrace probes.
package main

import (
	"bufio"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"syscall"
	"time"
)

var keep [4096][]byte

//go:noinline
func alloc(i int) {
	keep[i%len(keep)] = make([]byte, 1024)
}

func cpuNs() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}

func main() {
	rate, err := strconv.Atoi(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "usage: goalloc RATE")
		os.Exit(2)
	}
	runtime.MemProfileRate = rate
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		n, err := strconv.Atoi(in.Text())
		if err != nil || n <= 0 {
			continue
		}
		w0, c0 := time.Now(), cpuNs()
		for i := 0; i < n; i++ {
			alloc(i)
		}
		c1, w1 := cpuNs(), time.Now()
		fmt.Printf("ns_per_pair %.1f cpu_ns_per_pair %.1f\n",
			float64(w1.Sub(w0).Nanoseconds())/float64(n), float64(c1-c0)/float64(n))
	}
}
