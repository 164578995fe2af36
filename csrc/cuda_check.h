// Error checking for CUDA calls and kernel launches.
//
// LFADS_CUDA_CHECK(expr) evaluates a CUDA runtime call and throws std::runtime_error naming the
// op, the call, the file and line and CUDA's own message. After a launch, check
// cudaGetLastError(): launch-configuration errors (too much shared memory, too many threads)
// surface only there, and a wrong answer must never pass silently. Errors raised by a kernel
// while it runs show up at a later call on the stream; the Python layer synchronises in its
// tests so that such an error is reported near its cause.
//
// Each .cu file defines LFADS_CUDA_OP ("gru", "decoder", ...) before including this header so
// that messages name the op.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#ifndef LFADS_CUDA_OP
#define LFADS_CUDA_OP "cuda"
#endif

namespace lfads {

[[noreturn]] inline void cuda_fail(cudaError_t err, const char* op, const char* expr,
                                   const char* file, int line) {
  throw std::runtime_error(std::string("lfads_fast ") + op + ": " + expr + " failed at " + file +
                           ":" + std::to_string(line) + ": " + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + ")");
}

}  // namespace lfads

#define LFADS_CUDA_CHECK(expr)                                                     \
  do {                                                                             \
    const cudaError_t lfads_err_ = (expr);                                         \
    if (lfads_err_ != cudaSuccess)                                                 \
      ::lfads::cuda_fail(lfads_err_, LFADS_CUDA_OP, #expr, __FILE__, __LINE__);    \
  } while (0)

// Throws std::invalid_argument with the op's name when a precondition does not hold.
#define LFADS_CUDA_REQUIRE(cond, msg)                                              \
  do {                                                                             \
    if (!(cond))                                                                   \
      throw std::invalid_argument(std::string("lfads_fast ") + LFADS_CUDA_OP +     \
                                  ": " + (msg));                                   \
  } while (0)
