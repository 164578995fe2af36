// Reading the exported real-time model file (load time only; nothing here runs in a step).
//
// The file is safetensors (https://huggingface.co/docs/safetensors): an 8-byte little-endian
// header length n, n bytes of JSON, then the tensor bytes. The JSON maps tensor names to
// {"dtype", "shape", "data_offsets": [begin, end]} (offsets into the bytes after the header)
// and "__metadata__" to string pairs. The parser below reads exactly that JSON subset (objects,
// arrays, strings with escapes, numbers, true/false/null) and the config JSON stored in the
// metadata; lfads_fast writes the file with the safetensors package (lfads_fast/export.py).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace lfads {
namespace rt {

struct Json {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  bool b = false;
  double num = 0.0;
  std::string str;
  std::vector<Json> arr;
  std::vector<std::pair<std::string, Json>> obj;

  const Json* get(const std::string& key) const;  // member of an object, or nullptr
};

// Parses text as one JSON value; false and a message in err on a syntax error.
bool parse_json(const std::string& text, Json* out, std::string* err);

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;  // row-major
};

struct SafetensorsFile {
  std::map<std::string, std::string> metadata;
  std::map<std::string, Tensor> tensors;
};

enum class ReadError { None, Io, Format };

// Reads a whole safetensors file of float32 tensors. On failure returns Io (cannot open or
// read) or Format (truncated, corrupt, not safetensors, or a dtype other than F32) with a
// message in err.
ReadError read_safetensors(const char* path, SafetensorsFile* out, std::string* err);

}  // namespace rt
}  // namespace lfads
