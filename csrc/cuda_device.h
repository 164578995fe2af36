// Device queries used by the CUDA bindings, kept in the CUDA library so that the host-compiled
// bindings need no CUDA calls of their own.
#pragma once

#include <string>

namespace lfads {

int cuda_device_count();             // 0 when there is no driver or no device
std::string cuda_device_name(int i);  // throws std::runtime_error for a bad index
// Ordinal of the device that owns `ptr`, or -1 when ptr is not device (or managed) memory.
int cuda_pointer_device(const void* ptr);
// Makes `device` current for this host thread (the runtime's state is per thread).
void cuda_set_device(int device);

}  // namespace lfads
