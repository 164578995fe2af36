// safetensors reader and the JSON subset of its header (see realtime_format.h).
#include "realtime_format.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace lfads {
namespace rt {

const Json* Json::get(const std::string& key) const {
  if (kind != Object) return nullptr;
  for (const auto& kv : obj)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

namespace {

// Nesting is bounded so that a hostile header cannot exhaust the stack.
constexpr int kMaxDepth = 64;
// The header of an exported model is a few kB; anything near this is not one of ours.
constexpr uint64_t kMaxHeader = 100u << 20;

struct Parser {
  const std::string& s;
  size_t i = 0;
  std::string err;

  explicit Parser(const std::string& text) : s(text) {}

  bool fail(const char* what) {
    char buf[96];
    std::snprintf(buf, sizeof(buf), "%s at offset %zu of the JSON header", what, i);
    err = buf;
    return false;
  }
  void ws() {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) ++i;
  }
  bool literal(const char* word) {
    const size_t n = std::strlen(word);
    if (s.compare(i, n, word) != 0) return fail("invalid literal");
    i += n;
    return true;
  }
  static void put_utf8(unsigned cp, std::string* o) {
    if (cp < 0x80) {
      o->push_back(char(cp));
    } else if (cp < 0x800) {
      o->push_back(char(0xC0 | (cp >> 6)));
      o->push_back(char(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      o->push_back(char(0xE0 | (cp >> 12)));
      o->push_back(char(0x80 | ((cp >> 6) & 0x3F)));
      o->push_back(char(0x80 | (cp & 0x3F)));
    } else {
      o->push_back(char(0xF0 | (cp >> 18)));
      o->push_back(char(0x80 | ((cp >> 12) & 0x3F)));
      o->push_back(char(0x80 | ((cp >> 6) & 0x3F)));
      o->push_back(char(0x80 | (cp & 0x3F)));
    }
  }
  bool hex4(unsigned* cp) {
    if (i + 4 > s.size()) return fail("truncated \\u escape");
    unsigned v = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = s[i++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= unsigned(c - '0');
      else if (c >= 'a' && c <= 'f') v |= unsigned(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= unsigned(c - 'A' + 10);
      else return fail("bad \\u escape");
    }
    *cp = v;
    return true;
  }
  bool string(std::string* o) {
    if (i >= s.size() || s[i] != '"') return fail("expected a string");
    ++i;
    while (true) {
      if (i >= s.size()) return fail("unterminated string");
      const char c = s[i++];
      if (c == '"') return true;
      if (static_cast<unsigned char>(c) < 0x20) return fail("control character in string");
      if (c != '\\') {
        o->push_back(c);
        continue;
      }
      if (i >= s.size()) return fail("unterminated escape");
      const char e = s[i++];
      switch (e) {
        case '"': o->push_back('"'); break;
        case '\\': o->push_back('\\'); break;
        case '/': o->push_back('/'); break;
        case 'b': o->push_back('\b'); break;
        case 'f': o->push_back('\f'); break;
        case 'n': o->push_back('\n'); break;
        case 'r': o->push_back('\r'); break;
        case 't': o->push_back('\t'); break;
        case 'u': {
          unsigned cp;
          if (!hex4(&cp)) return false;
          if (cp >= 0xD800 && cp < 0xDC00) {  // surrogate pair
            unsigned lo;
            if (i + 2 > s.size() || s[i] != '\\' || s[i + 1] != 'u') return fail("lone surrogate");
            i += 2;
            if (!hex4(&lo) || lo < 0xDC00 || lo > 0xDFFF) return fail("bad surrogate pair");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          put_utf8(cp, o);
          break;
        }
        default: return fail("bad escape");
      }
    }
  }
  bool number(double* v) {
    const size_t start = i;
    if (i < s.size() && s[i] == '-') ++i;
    while (i < s.size() && ((s[i] >= '0' && s[i] <= '9') || s[i] == '.' || s[i] == 'e' ||
                            s[i] == 'E' || s[i] == '+' || s[i] == '-'))
      ++i;
    const std::string tok = s.substr(start, i - start);
    if (tok.empty() || tok == "-") return fail("expected a value");
    char* end = nullptr;
    *v = std::strtod(tok.c_str(), &end);
    if (end != tok.c_str() + tok.size()) return fail("bad number");
    return true;
  }
  bool value(Json* v, int depth) {
    if (depth > kMaxDepth) return fail("nesting too deep");
    ws();
    if (i >= s.size()) return fail("unexpected end");
    const char c = s[i];
    if (c == '{') {
      v->kind = Json::Object;
      ++i;
      ws();
      if (i < s.size() && s[i] == '}') { ++i; return true; }
      while (true) {
        ws();
        std::string key;
        if (!string(&key)) return false;
        ws();
        if (i >= s.size() || s[i] != ':') return fail("expected ':'");
        ++i;
        v->obj.emplace_back(std::move(key), Json());
        if (!value(&v->obj.back().second, depth + 1)) return false;
        ws();
        if (i < s.size() && s[i] == ',') { ++i; continue; }
        if (i < s.size() && s[i] == '}') { ++i; return true; }
        return fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      v->kind = Json::Array;
      ++i;
      ws();
      if (i < s.size() && s[i] == ']') { ++i; return true; }
      while (true) {
        v->arr.emplace_back();
        if (!value(&v->arr.back(), depth + 1)) return false;
        ws();
        if (i < s.size() && s[i] == ',') { ++i; continue; }
        if (i < s.size() && s[i] == ']') { ++i; return true; }
        return fail("expected ',' or ']'");
      }
    }
    if (c == '"') {
      v->kind = Json::String;
      return string(&v->str);
    }
    if (c == 't') { v->kind = Json::Bool; v->b = true; return literal("true"); }
    if (c == 'f') { v->kind = Json::Bool; v->b = false; return literal("false"); }
    if (c == 'n') { v->kind = Json::Null; return literal("null"); }
    v->kind = Json::Number;
    return number(&v->num);
  }
};

bool as_int64(const Json& j, int64_t* out) {
  if (j.kind != Json::Number || j.num < 0 || j.num > 9.0e15 || j.num != static_cast<double>(static_cast<int64_t>(j.num)))
    return false;
  *out = static_cast<int64_t>(j.num);
  return true;
}

}  // namespace

bool parse_json(const std::string& text, Json* out, std::string* err) {
  Parser p(text);
  if (!p.value(out, 0)) {
    *err = p.err;
    return false;
  }
  p.ws();
  if (p.i != text.size()) {
    p.fail("trailing characters");
    *err = p.err;
    return false;
  }
  return true;
}

ReadError read_safetensors(const char* path, SafetensorsFile* out, std::string* err) {
  std::FILE* f = std::fopen(path, "rb");
  if (!f) {
    *err = "cannot open the file";
    return ReadError::Io;
  }
  std::vector<char> bytes;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) bytes.insert(bytes.end(), buf, buf + n);
  const bool bad = std::ferror(f) != 0;
  std::fclose(f);
  if (bad) {
    *err = "read error";
    return ReadError::Io;
  }
  if (bytes.size() < 8) {
    *err = "too short for a safetensors file (no header length)";
    return ReadError::Format;
  }
  uint64_t hlen = 0;
  for (int k = 7; k >= 0; --k) hlen = (hlen << 8) | static_cast<unsigned char>(bytes[k]);
  if (hlen < 2 || hlen > kMaxHeader || hlen > bytes.size() - 8) {
    *err = "not a safetensors file, or truncated (header length " + std::to_string(hlen) +
           ", file size " + std::to_string(bytes.size()) + ")";
    return ReadError::Format;
  }
  const std::string header(bytes.data() + 8, hlen);
  Json root;
  std::string jerr;
  if (!parse_json(header, &root, &jerr)) {
    *err = "not a safetensors file: " + jerr;
    return ReadError::Format;
  }
  if (root.kind != Json::Object) {
    *err = "not a safetensors file: the header is not a JSON object";
    return ReadError::Format;
  }
  const uint64_t data_size = bytes.size() - 8 - hlen;
  const char* data = bytes.data() + 8 + hlen;
  for (const auto& kv : root.obj) {
    const std::string& name = kv.first;
    const Json& t = kv.second;
    if (name == "__metadata__") {
      if (t.kind != Json::Object) {
        *err = "__metadata__ is not an object";
        return ReadError::Format;
      }
      for (const auto& m : t.obj) {
        if (m.second.kind != Json::String) {
          *err = "__metadata__ value of '" + m.first + "' is not a string";
          return ReadError::Format;
        }
        out->metadata[m.first] = m.second.str;
      }
      continue;
    }
    const Json* dtype = t.get("dtype");
    const Json* shape = t.get("shape");
    const Json* offs = t.get("data_offsets");
    if (!dtype || dtype->kind != Json::String || !shape || shape->kind != Json::Array || !offs ||
        offs->kind != Json::Array || offs->arr.size() != 2) {
      *err = "tensor '" + name + "' lacks dtype, shape or data_offsets";
      return ReadError::Format;
    }
    if (dtype->str != "F32") {
      *err = "tensor '" + name + "' has dtype " + dtype->str + " (expected F32)";
      return ReadError::Format;
    }
    Tensor tensor;
    int64_t count = 1;
    for (const Json& d : shape->arr) {
      int64_t v;
      if (!as_int64(d, &v) || (v > 0 && count > (int64_t(1) << 40) / v)) {
        *err = "tensor '" + name + "' has an invalid shape";
        return ReadError::Format;
      }
      tensor.shape.push_back(v);
      count *= v;
    }
    int64_t b, e;
    if (!as_int64(offs->arr[0], &b) || !as_int64(offs->arr[1], &e) || e < b ||
        static_cast<uint64_t>(e) > data_size) {
      *err = "tensor '" + name + "' lies outside the file (truncated?): bytes " +
             std::to_string(offs->arr[0].num) + ".." + std::to_string(offs->arr[1].num) + " of " +
             std::to_string(data_size);
      return ReadError::Format;
    }
    if (e - b != count * 4) {
      *err = "tensor '" + name + "' has " + std::to_string(e - b) + " bytes for " +
             std::to_string(count) + " float32 values";
      return ReadError::Format;
    }
    tensor.data.resize(static_cast<size_t>(count));
    if (count) std::memcpy(tensor.data.data(), data + b, static_cast<size_t>(count) * 4);  // little-endian hosts
    out->tensors[name] = std::move(tensor);
  }
  return ReadError::None;
}

}  // namespace rt
}  // namespace lfads
