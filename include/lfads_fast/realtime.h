/* lfads_fast real-time inference: a C API for embedding a trained LFADS model in a
 * closed-loop decoder (one bin of spike counts in, rates / factors / decoded outputs out).
 *
 * Conventions (SQLite- and RTNeural-like):
 *   - lfrt_model is an opaque, read-only handle made by lfrt_model_load from an exported
 *     file (`lfads-fast export`, docs/realtime.md). One model may serve any number of
 *     streams, from any threads: nothing in it changes after load.
 *   - The state of one stream lives in memory the CALLER owns: ask lfrt_state_size for its
 *     size, provide that many bytes aligned to LFRT_STATE_ALIGN, and lfrt_state_init lays the
 *     state out there. A state belongs to one thread at a time. The state holds pointers into
 *     its own memory: do not copy or move that memory (init a new state instead).
 *   - Every function returns an lfrt_status; lfrt_status_string gives its message and
 *     lfrt_state_error / the err buffer of lfrt_model_load the details of the last error.
 *   - Nothing is allocated after load: lfrt_step does no allocation, locking, system call or
 *     exception and touches only its state, the read-only model and the caller's buffers.
 *   - A bin refused by lfrt_step (wrong channel count, NaN, negative or huge count) leaves
 *     the state exactly as it was: the stream goes on with the next bin.
 *
 * Shapes: N_in channels of counts per bin (the model's encod_data_dim), N_out rate channels
 * (recon_data_dim), F factors, D decoded outputs (0 without a fitted decoder). float32
 * throughout.
 */
#ifndef LFADS_FAST_REALTIME_H
#define LFADS_FAST_REALTIME_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define LFRT_API __declspec(dllexport)
#else
#define LFRT_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Version of the exported file format this library reads (metadata "format_version"). */
#define LFRT_FORMAT_VERSION 1
/* Alignment of the caller's state memory, in bytes. */
#define LFRT_STATE_ALIGN 64

typedef enum lfrt_status {
  LFRT_OK = 0,
  LFRT_ERR_ARGUMENT = 1,      /* a null pointer, bad options, or a buffer too small */
  LFRT_ERR_IO = 2,            /* the model file cannot be opened or read */
  LFRT_ERR_FORMAT = 3,        /* not an lfads_fast real-time file, or a truncated/corrupt one */
  LFRT_ERR_VERSION = 4,       /* written by a newer format version than this library reads */
  LFRT_ERR_UNSUPPORTED = 5,   /* a model or mode this library cannot run (see the message) */
  LFRT_ERR_CHANNELS = 6,      /* the bin has the wrong number of channels */
  LFRT_ERR_NAN = 7,           /* the bin has a NaN or infinite count */
  LFRT_ERR_NEGATIVE = 8,      /* the bin has a negative count */
  LFRT_ERR_HUGE = 9,          /* the bin has a count above the state's max_count */
  LFRT_ERR_MEMORY = 10        /* out of memory while loading */
} lfrt_status;

typedef enum lfrt_mode {
  /* Re-run the offline forward pass (posterior means) over the last `window` bins every bin:
   * exact parity with model.forward; works for every model. */
  LFRT_MODE_WINDOW = 0,
  /* Advance the encoders, controller and generator by one bin: O(1) per bin. Needs a model
   * trained with ic_enc_seq_len > 0 and, with a controller, ci_enc_causal. */
  LFRT_MODE_STREAMING = 1
} lfrt_mode;

typedef struct lfrt_model lfrt_model;
typedef struct lfrt_state lfrt_state;

typedef struct lfrt_model_info {
  int32_t n_in;           /* channels of counts per bin (encod_data_dim) */
  int32_t n_out;          /* rate channels (recon_data_dim) */
  int32_t n_factors;      /* F */
  int32_t n_decoded;      /* D: outputs of the fitted decoder, 0 without one */
  int32_t seq_len;        /* encod_seq_len: the trial length the model was trained on */
  int32_t ic_enc_seq_len; /* bins the initial condition is encoded from */
  int32_t streaming;      /* 1 when LFRT_MODE_STREAMING can run this model */
  int32_t format_version; /* of the file */
} lfrt_model_info;

typedef struct lfrt_options {
  int32_t mode;       /* lfrt_mode */
  int32_t window;     /* WINDOW: bins per forward pass, 1 .. 100000; 0 = the model's seq_len */
  int32_t lookahead;  /* WINDOW: report bin t - lookahead (0 .. window - 1) */
  float max_count;    /* counts above this are refused as huge; 0 = 1000 */
} lfrt_options;

typedef struct lfrt_output {
  float* rates;     /* [n_out] expected counts per bin, or NULL */
  float* factors;   /* [n_factors], or NULL */
  float* decoded;   /* [n_decoded], or NULL */
  int64_t bin;      /* out: index (since reset) of the bin the outputs belong to */
  int32_t ready;    /* out: 0 while too few bins have arrived (outputs untouched) */
} lfrt_output;

/* Message of a status code (a static string). */
LFRT_API const char* lfrt_status_string(lfrt_status status);

/* Loads an exported model. On failure *model is NULL and, when err is not NULL, a message
 * naming the file and the problem is written to err (at most err_len bytes, terminated). */
LFRT_API lfrt_status lfrt_model_load(const char* path, lfrt_model** model, char* err,
                                     size_t err_len);
LFRT_API void lfrt_model_free(lfrt_model* model);
LFRT_API lfrt_status lfrt_model_get_info(const lfrt_model* model, lfrt_model_info* info);
/* The model's config as the JSON string stored in the file (owned by the model). */
LFRT_API const char* lfrt_model_config_json(const lfrt_model* model);

/* Bytes of state memory a stream with these options needs (0 and a message in err when the
 * options do not fit the model). */
LFRT_API size_t lfrt_state_size(const lfrt_model* model, const lfrt_options* options, char* err,
                                size_t err_len);
/* Lays out a stream's state in mem ([size] bytes, LFRT_STATE_ALIGN-aligned) and resets it.
 * The model must outlive the state. Nothing needs freeing: the caller owns mem. */
LFRT_API lfrt_status lfrt_state_init(const lfrt_model* model, const lfrt_options* options,
                                     void* mem, size_t size, lfrt_state** state);
/* Forgets all bins: the next bin is bin 0 of a new trial. */
LFRT_API lfrt_status lfrt_reset(lfrt_state* state);
/* One bin of counts ([n_channels] floats). On an error status the state is unchanged. */
LFRT_API lfrt_status lfrt_step(lfrt_state* state, const float* counts, int32_t n_channels,
                               lfrt_output* out);
/* Details of the last error of this state's lfrt_step (a string inside the state). */
LFRT_API const char* lfrt_state_error(const lfrt_state* state);

#ifdef __cplusplus
}
#endif

#endif /* LFADS_FAST_REALTIME_H */
