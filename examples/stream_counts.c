/* Streams a recorded file of spike counts through an exported LFADS model, bin by bin, with
 * the real-time C API of lfads_fast, and prints each bin's outputs and the step latencies.
 *
 *   stream_counts MODEL.safetensors COUNTS.f32 [--mode window|streaming] [--window W]
 *                 [--lookahead L] [--repeat R] [--bad-every K] [--quiet]
 *
 * COUNTS.f32: raw little-endian float32 counts, bins one after the other, n_in per bin (the
 * model's channel count). --repeat R streams the file R times (no reset between passes:
 * one long stream), for latency statistics over many bins. --bad-every K sends, before
 * every K-th bin, a copy of it with a NaN count: the library refuses it (reported on stderr)
 * and the stream goes on, the outputs as without it.
 * stdout: one line per bin with outputs: "bin r_0 ... r_{n_out-1} | f_0 ... | d_0 ...".
 * stderr: latency p50 / p99 / max of lfrt_step in microseconds, and the number of heap
 * allocations made inside lfrt_step (counted by the malloc wrappers below, not assumed).
 *
 * Build against the installed library:
 *   cmake -S examples -B build/ex -DCMAKE_PREFIX_PATH=$(python -m lfads_fast.realtime --prefix)
 *   (or: cc stream_counts.c $(pkg-config --cflags --libs lfads_fast_realtime))
 */
#define _GNU_SOURCE
#include <lfads_fast/realtime.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Heap allocations while `counting` is set: these definitions interpose glibc's malloc family
 * for the whole process, the library included. */
extern void* __libc_malloc(size_t);
extern void* __libc_calloc(size_t, size_t);
extern void* __libc_realloc(void*, size_t);
extern void* __libc_memalign(size_t, size_t);
static volatile int counting = 0;
static volatile long n_allocs = 0;
void* malloc(size_t n) { if (counting) ++n_allocs; return __libc_malloc(n); }
void* calloc(size_t a, size_t b) { if (counting) ++n_allocs; return __libc_calloc(a, b); }
void* realloc(void* p, size_t n) { if (counting) ++n_allocs; return __libc_realloc(p, n); }
void* memalign(size_t a, size_t n) { if (counting) ++n_allocs; return __libc_memalign(a, n); }
int posix_memalign(void** p, size_t a, size_t n) {
  if (counting) ++n_allocs;
  *p = __libc_memalign(a, n);
  return *p ? 0 : 12;
}
void* aligned_alloc(size_t a, size_t n) { if (counting) ++n_allocs; return __libc_memalign(a, n); }

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

static int cmp_double(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}

static void print_vec(const float* v, int n) {
  for (int i = 0; i < n; ++i) printf(" %.9g", v[i]);
}

int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s MODEL.safetensors COUNTS.f32 [--mode window|streaming] [--window W] "
                    "[--lookahead L] [--repeat R] [--quiet]\n", argv[0]);
    return 2;
  }
  lfrt_options opt = {LFRT_MODE_WINDOW, 0, 0, 0.f};
  long repeat = 1, bad_every = 0;
  int quiet = 0;
  for (int i = 3; i < argc; ++i) {
    if (!strcmp(argv[i], "--mode") && i + 1 < argc) {
      ++i;
      opt.mode = !strcmp(argv[i], "streaming") ? LFRT_MODE_STREAMING : LFRT_MODE_WINDOW;
    } else if (!strcmp(argv[i], "--window") && i + 1 < argc) {
      opt.window = atoi(argv[++i]);
    } else if (!strcmp(argv[i], "--lookahead") && i + 1 < argc) {
      opt.lookahead = atoi(argv[++i]);
    } else if (!strcmp(argv[i], "--repeat") && i + 1 < argc) {
      repeat = atol(argv[++i]);
    } else if (!strcmp(argv[i], "--bad-every") && i + 1 < argc) {
      bad_every = atol(argv[++i]);
    } else if (!strcmp(argv[i], "--quiet")) {
      quiet = 1;
    } else {
      fprintf(stderr, "unknown argument %s\n", argv[i]);
      return 2;
    }
  }

  char err[512];
  lfrt_model* model;
  lfrt_status st = lfrt_model_load(argv[1], &model, err, sizeof(err));
  if (st != LFRT_OK) {
    fprintf(stderr, "error: %s (%s)\n", err, lfrt_status_string(st));
    return 1;
  }
  lfrt_model_info info;
  lfrt_model_get_info(model, &info);

  FILE* f = fopen(argv[2], "rb");
  if (!f) {
    fprintf(stderr, "error: cannot open %s\n", argv[2]);
    return 1;
  }
  fseek(f, 0, SEEK_END);
  const long bytes = ftell(f);
  fseek(f, 0, SEEK_SET);
  const long T = bytes / (long)(sizeof(float) * info.n_in);
  if (T < 1 || bytes % (long)(sizeof(float) * info.n_in) != 0) {
    fprintf(stderr, "error: %s holds %ld bytes, not a whole number of bins of %d float32 counts\n",
            argv[2], bytes, info.n_in);
    return 1;
  }
  float* counts = malloc((size_t)bytes);
  if (fread(counts, 1, (size_t)bytes, f) != (size_t)bytes) {
    fprintf(stderr, "error: cannot read %s\n", argv[2]);
    return 1;
  }
  fclose(f);

  const size_t size = lfrt_state_size(model, &opt, err, sizeof(err));
  if (size == 0) {
    fprintf(stderr, "error: %s\n", err);
    return 1;
  }
  void* mem = aligned_alloc(LFRT_STATE_ALIGN, (size + LFRT_STATE_ALIGN - 1) / LFRT_STATE_ALIGN * LFRT_STATE_ALIGN);
  lfrt_state* state;
  if ((st = lfrt_state_init(model, &opt, mem, size, &state)) != LFRT_OK) {
    fprintf(stderr, "error: %s\n", lfrt_status_string(st));
    return 1;
  }
  float* rates = malloc(sizeof(float) * info.n_out);
  float* factors = malloc(sizeof(float) * info.n_factors);
  float* decoded = malloc(sizeof(float) * (info.n_decoded ? info.n_decoded : 1));
  lfrt_output out = {rates, factors, info.n_decoded ? decoded : NULL, 0, 0};
  /* The counter must see allocations made from here, or its zero below would mean nothing. */
  counting = 1;
  free(malloc(16));
  counting = 0;
  if (n_allocs != 1) {
    fprintf(stderr, "error: the allocation counter does not interpose malloc\n");
    return 1;
  }
  n_allocs = 0;
  const long total = T * repeat;
  double* lat = malloc(sizeof(double) * (size_t)total);
  float* bad = malloc(sizeof(float) * info.n_in);
  long n_ready = 0, n_refused = 0;

  for (long k = 0; k < total; ++k) {
    const float* bin = counts + (k % T) * info.n_in;
    if (bad_every > 0 && k % bad_every == 0) {
      memcpy(bad, bin, sizeof(float) * info.n_in);
      bad[0] = 0.f / 0.f;
      counting = 1;
      st = lfrt_step(state, bad, info.n_in, &out);
      counting = 0;
      if (st == LFRT_OK) {
        fprintf(stderr, "error: a NaN count was accepted\n");
        return 1;
      }
      ++n_refused;
      if (!quiet) fprintf(stderr, "refused: %s: %s\n", lfrt_status_string(st), lfrt_state_error(state));
    }
    counting = 1;
    const double t0 = now_us();
    st = lfrt_step(state, bin, info.n_in, &out);
    const double t1 = now_us();
    counting = 0;
    lat[k] = t1 - t0;
    if (st != LFRT_OK) {  /* a refused bin: report and go on with the next one */
      fprintf(stderr, "bin %ld refused: %s: %s\n", k, lfrt_status_string(st), lfrt_state_error(state));
      continue;
    }
    if (out.ready) {
      ++n_ready;
      if (!quiet) {
        printf("%lld", (long long)out.bin);
        print_vec(rates, info.n_out);
        printf(" |");
        print_vec(factors, info.n_factors);
        printf(" |");
        print_vec(decoded, info.n_decoded);
        printf("\n");
      }
    }
  }
  qsort(lat, (size_t)total, sizeof(double), cmp_double);
  fprintf(stderr, "refused %ld bins %ld outputs %ld p50_us %.3f p99_us %.3f max_us %.3f allocs_in_step %ld state_bytes %zu\n",
          n_refused, total, n_ready, lat[total / 2], lat[(long)(total * 0.99)], lat[total - 1], n_allocs, size);
  free(lat);
  free(bad);
  free(rates);
  free(factors);
  free(decoded);
  free(counts);
  free(mem);
  lfrt_model_free(model);
  return 0;
}
