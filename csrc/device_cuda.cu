// Device queries for the bindings (see cuda_device.h).
#define LFADS_CUDA_OP "device"
#include "cuda_check.h"
#include "cuda_device.h"

namespace lfads {

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver / no device is an answer here, not an error to keep
    return 0;
  }
  return n;
}

std::string cuda_device_name(int i) {
  cudaDeviceProp prop;
  LFADS_CUDA_CHECK(cudaGetDeviceProperties(&prop, i));
  return prop.name;
}

int cuda_pointer_device(const void* ptr) {
  cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  if (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) return attr.device;
  return -1;
}

void cuda_set_device(int device) { LFADS_CUDA_CHECK(cudaSetDevice(device)); }

}  // namespace lfads
