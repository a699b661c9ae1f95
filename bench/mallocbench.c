/*
 * mallocbench: the cost of one malloc/free pair, as seen by the program.
 *
 * Usage: mallocbench [THREADS]   (default 2)
 *
 * Prints "ready" once started, then reads one line per measured phase
 * from stdin: the number of malloc/free pairs each thread does. Every
 * thread runs its pairs (sizes cycling 16..4096 bytes) between two readings
 * of CLOCK_MONOTONIC and of CLOCK_THREAD_CPUTIME_ID; the program prints
 *     ns_per_pair <wall> cpu_ns_per_pair <cpu>
 * (each the mean over threads of elapsed ns / pairs) and waits for the next
 * line. The thread's CPU time includes the probe traps and the eBPF programs
 * (they run in the thread's context) but not time spent waiting for a CPU,
 * so it holds steady when other work shares the machine. EOF ends it. The tracer attaches between
 * "ready" and the first line, so probes are in place before any measured
 * pair runs.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const size_t sizes[] = {16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 2048, 4096};
#define NSIZES (sizeof(sizes) / sizeof(sizes[0]))

struct worker {
    pthread_t thread;
    pthread_barrier_t *start;
    unsigned long pairs;
    double ns;
    double cpu_ns;
};

static double now_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static void *work(void *arg)
{
    struct worker *w = arg;
    pthread_barrier_wait(w->start);
    double t0 = now_ns(CLOCK_MONOTONIC);
    double c0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
    for (unsigned long i = 0; i < w->pairs; i++) {
        char *p = malloc(sizes[i % NSIZES]);
        if (!p)
            abort();
        p[0] = (char)i;
        /* Keep the compiler from pairing malloc with free away. */
        __asm__ volatile("" : : "r"(p) : "memory");
        free(p);
    }
    w->cpu_ns = now_ns(CLOCK_THREAD_CPUTIME_ID) - c0;
    w->ns = now_ns(CLOCK_MONOTONIC) - t0;
    return NULL;
}

int main(int argc, char **argv)
{
    int nthreads = argc > 1 ? atoi(argv[1]) : 2;
    if (nthreads < 1 || nthreads > 64) {
        fprintf(stderr, "mallocbench: THREADS must be 1..64\n");
        return 2;
    }
    struct worker w[64];
    char line[64];
    printf("ready\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        unsigned long pairs = strtoul(line, NULL, 10);
        if (pairs == 0) {
            fprintf(stderr, "mallocbench: expected a pair count, got %s", line);
            return 2;
        }
        pthread_barrier_t start;
        pthread_barrier_init(&start, NULL, (unsigned)nthreads);
        for (int t = 0; t < nthreads; t++) {
            w[t].start = &start;
            w[t].pairs = pairs;
            if (pthread_create(&w[t].thread, NULL, work, &w[t]) != 0) {
                perror("mallocbench: pthread_create");
                return 2;
            }
        }
        double sum = 0, cpu_sum = 0;
        for (int t = 0; t < nthreads; t++) {
            pthread_join(w[t].thread, NULL);
            sum += w[t].ns / (double)pairs;
            cpu_sum += w[t].cpu_ns / (double)pairs;
        }
        pthread_barrier_destroy(&start);
        printf("ns_per_pair %.2f cpu_ns_per_pair %.2f\n", sum / nthreads, cpu_sum / nthreads);
        fflush(stdout);
    }
    return 0;
}
