// lfads_fast real-time inference: model loading, per-stream state and the per-bin step
// (include/lfads_fast/realtime.h is the contract, docs/realtime.md the user's guide).
//
// Both modes run the model's own equations (docs/math.md) at batch 1 in float32, with the
// clipped-GRU cell of gru_cell.h, the one the training kernels use:
//   window     every bin, the offline forward pass with posterior means over the last W bins
//              (encoders, IC, controller and generator), reporting bin W-1-L of the window;
//              the encoders' input projection of each bin is computed once, when it arrives,
//              and kept in a ring of W rows.
//   streaming  the IC is encoded from the first K = ic_enc_seq_len bins; at bin K-1 the
//              decoder catches up over those K bins (their controller input is 0, as in
//              training), after which each bin advances the forward CI encoder, controller
//              and generator by one step.
// Loading may allocate and fail; lfrt_step never allocates, locks, throws or calls the OS.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>

#include "gru_cell.h"
#include "realtime.h"
#include "realtime_format.h"

using lfads::rt::Json;
using lfads::rt::Model;

struct lfrt_state {
  const Model* m;
  int32_t mode, W, L;
  float max_count;
  int64_t bin;       // bins accepted since reset
  // window: ring of W encoder projections [W][P], head = slot of the next bin
  // streaming: the first K bins' projections [K][P]
  float* xring;
  int head;
  float *hf, *hb, *hnew, *tmp;      // [max H], [max H], [max H], [3 max H + max H]
  float *cf, *cb;                   // window: [W][Hc] each; streaming: cf ring [lag+1][Hc]
  float *ci_h;                      // streaming: forward CI-encoder state [Hc]
  float *icm, *c, *g, *f, *xc, *xg, *u, *rates;
  float *feat;                      // decoder feature ring [dec_lag+1][features]
  char err[256];
};

namespace {

using lfads::gru_gate;
using lfads::gru_update;

// y[0..M) += sum_k x[k] Wt[k, 0..M), rows ldw apart, for sparse x (spike counts): zero
// inputs are skipped.
inline void matvec_acc_sparse(int K, int M, const float* Wt, int ldw, const float* x, float* y) {
  for (int k = 0; k < K; ++k) {
    const float xk = x[k];
    if (xk == 0.f) continue;
    const float* w = Wt + static_cast<int64_t>(k) * ldw;
#pragma omp simd
    for (int j = 0; j < M; ++j) y[j] += xk * w[j];
  }
}

// The same for dense x: four rows per pass over y, so y is loaded and stored a quarter as
// often (the loads and stores of y, not the multiplies, bound the one-row loop). The sums
// are still added in the order k = 0, 1, 2, ...
inline void matvec_acc(int K, int M, const float* Wt, int ldw, const float* x, float* y) {
  int k = 0;
  for (; k + 4 <= K; k += 4) {
    const float x0 = x[k], x1 = x[k + 1], x2 = x[k + 2], x3 = x[k + 3];
    const float* w0 = Wt + static_cast<int64_t>(k) * ldw;
    const float* w1 = w0 + ldw;
    const float* w2 = w1 + ldw;
    const float* w3 = w2 + ldw;
#pragma omp simd
    for (int j = 0; j < M; ++j) y[j] = (((y[j] + x0 * w0[j]) + x1 * w1[j]) + x2 * w2[j]) + x3 * w3[j];
  }
  for (; k < K; ++k) {
    const float xk = x[k];
    const float* w = Wt + static_cast<int64_t>(k) * ldw;
#pragma omp simd
    for (int j = 0; j < M; ++j) y[j] += xk * w[j];
  }
}

// One clipped-GRU step at batch 1: h_new = GRU(xin, h); xin [3H] holds the input projection
// including b_ih; Wt_hh [H][3H]; tmp [4H]. h_new must not alias h.
inline void gru_step(int H, const float* xin, const float* Wt_hh, const float* h, float clip,
                     float* h_new, float* tmp) {
  float* hzr = tmp;         // [2H]
  float* rh = tmp + 2 * H;  // [H]
  float* hn = tmp + 3 * H;  // [H]
  std::fill(hzr, hzr + 2 * H, 0.f);
  std::fill(hn, hn + H, 0.f);
  matvec_acc(H, 2 * H, Wt_hh, 3 * H, h, hzr);
#pragma omp simd
  for (int j = 0; j < H; ++j) {
    hzr[j] = gru_gate(xin[j], hzr[j]);
    rh[j] = gru_gate(xin[H + j], hzr[H + j]) * h[j];
  }
  matvec_acc(H, H, Wt_hh + 2 * H, 3 * H, rh, hn);
#pragma omp simd
  for (int j = 0; j < H; ++j) {
    float n;
    h_new[j] = gru_update(hzr[j], xin[2 * H + j], hn[j], h[j], clip, &n);
  }
}

// Runs one encoder GRU over rows [p0, p1) of the projection (forward, or backward when
// reverse), from its learned h0. Stores every state in hs ([p1 - p0][H]) when hs is not null;
// the final state ends in `last`.
void encoder_run(const lfrt_state* s, int e, int col, int H, int p0, int p1, bool reverse,
                 float* hs, float* last) {
  const Model& m = *s->m;
  float* h = s->hnew;
  std::memcpy(last, m.enc_h0[e].data(), sizeof(float) * H);
  for (int k = 0; k < p1 - p0; ++k) {
    const int p = reverse ? p1 - 1 - k : p0 + k;
    const int slot = s->mode == LFRT_MODE_WINDOW ? (s->head + p) % s->W : p;
    const float* x = s->xring + static_cast<int64_t>(slot) * m.P + col;
    gru_step(H, x, m.enc_hh[e].data(), last, m.clip, h, s->tmp);
    std::memcpy(last, h, sizeof(float) * H);
    if (hs) std::memcpy(hs + static_cast<int64_t>(p - p0) * H, h, sizeof(float) * H);
  }
}

// The initial condition from rows [0, n_ic) of the projection: g (generator state) and f.
void initial_state(lfrt_state* s, int n_ic) {
  const Model& m = *s->m;
  encoder_run(s, 0, 0, m.Hi, 0, n_ic, false, nullptr, s->hf);
  encoder_run(s, 1, 3 * m.Hi, m.Hi, 0, n_ic, true, nullptr, s->hb);
  std::memcpy(s->icm, m.icm_b.data(), sizeof(float) * m.ic_dim);
  matvec_acc(m.Hi, m.ic_dim, m.icm_Wt.data(), m.ic_dim, s->hf, s->icm);
  matvec_acc(m.Hi, m.ic_dim, m.icm_Wt.data() + m.Hi * m.ic_dim, m.ic_dim, s->hb, s->icm);
  std::memcpy(s->g, m.g0_b.data(), sizeof(float) * m.G);
  matvec_acc(m.ic_dim, m.G, m.g0_Wt.data(), m.G, s->icm, s->g);
  std::fill(s->f, s->f + m.F, 0.f);
  matvec_acc(m.G, m.F, m.fac_Wt.data(), m.F, s->g, s->f);
  if (m.C > 0) std::memcpy(s->c, m.con_h0.data(), sizeof(float) * m.C);
}

// One decoder step: controller (ci_f / ci_b: the lagged CI-encoder outputs of this step, or
// null for zeros), controller-output mean, generator, factors.
void decoder_step(lfrt_state* s, const float* ci_f, const float* ci_b) {
  const Model& m = *s->m;
  const int C = m.C, G = m.G, F = m.F, U = m.U, Hc = m.Hc;
  if (C > 0) {
    std::memcpy(s->xc, m.con_b.data(), sizeof(float) * 3 * C);
    if (ci_f) matvec_acc(Hc, 3 * C, m.con_ci_Wt.data(), 3 * C, ci_f, s->xc);
    if (ci_b) matvec_acc(Hc, 3 * C, m.con_ci_Wt.data() + static_cast<int64_t>(Hc) * 3 * C, 3 * C, ci_b, s->xc);
    matvec_acc(F, 3 * C, m.con_f_Wt.data(), 3 * C, s->f, s->xc);
    gru_step(C, s->xc, m.con_hh.data(), s->c, m.clip, s->hnew, s->tmp);
    std::memcpy(s->c, s->hnew, sizeof(float) * C);
    std::memcpy(s->u, m.com_b.data(), sizeof(float) * U);
    matvec_acc(C, U, m.com_Wt.data(), U, s->c, s->u);
    std::memcpy(s->xg, m.gen_b.data(), sizeof(float) * 3 * G);
    matvec_acc(U, 3 * G, m.gen_u_Wt.data(), 3 * G, s->u, s->xg);
  } else {
    std::memcpy(s->xg, m.gen_b.data(), sizeof(float) * 3 * G);
  }
  gru_step(G, s->xg, m.gen_hh.data(), s->g, m.clip, s->hnew, s->tmp);
  std::memcpy(s->g, s->hnew, sizeof(float) * G);
  std::fill(s->f, s->f + F, 0.f);
  matvec_acc(G, F, m.fac_Wt.data(), F, s->g, s->f);
}

// Window mode: the offline forward over the W bins in the ring, up to position W-1-L.
void window_forward(lfrt_state* s) {
  const Model& m = *s->m;
  const int W = s->W, Hc = m.Hc;
  const int n_ic = m.K > 0 ? std::min(m.K, W) : W;
  const int ci0 = m.K > 0 ? n_ic : 0;  // the CI encoder sees bins ci0 .. W-1
  const int n_ci = W - ci0;
  initial_state(s, n_ic);
  if (m.C > 0) {
    encoder_run(s, 2, m.off_ci, Hc, ci0, W, false, s->cf, s->hnew + Hc);
    if (!m.causal) encoder_run(s, 3, m.off_ci + 3 * Hc, Hc, ci0, W, true, s->cb, s->hnew + Hc);
  }
  for (int p = 0; p <= W - 1 - s->L; ++p) {
    const float *ci_f = nullptr, *ci_b = nullptr;
    const int q = p - ci0;
    if (m.C > 0 && q >= 0) {
      if (q - m.lag >= 0) ci_f = s->cf + static_cast<int64_t>(q - m.lag) * Hc;
      if (!m.causal && q + m.lag < n_ci) ci_b = s->cb + static_cast<int64_t>(q + m.lag) * Hc;
    }
    decoder_step(s, ci_f, ci_b);
  }
}

// Streaming mode, bin t (0-based since reset) whose projection is in place. Returns whether
// the decoder produced bin t.
bool streaming_step(lfrt_state* s, int64_t t) {
  const Model& m = *s->m;
  const int K = m.K, Hc = m.Hc, R = m.lag + 1;
  if (t < K - 1) return false;
  if (t == K - 1) {  // the IC is known: catch up over the first K bins (no controller input)
    initial_state(s, K);
    if (m.C > 0) std::memcpy(s->ci_h, m.enc_h0[2].data(), sizeof(float) * Hc);
    for (int p = 0; p < K; ++p) decoder_step(s, nullptr, nullptr);
    return true;
  }
  const float* ci_f = nullptr;
  if (m.C > 0) {
    const int64_t q = t - K;
    const float* x = s->xring + m.off_ci;  // row 0 holds this bin's CI projection
    float* slot = s->cf + (q % R) * Hc;
    gru_step(Hc, x, m.enc_hh[2].data(), s->ci_h, m.clip, slot, s->tmp);
    std::memcpy(s->ci_h, slot, sizeof(float) * Hc);
    if (q - m.lag >= 0) ci_f = s->cf + ((q - m.lag) % R) * Hc;
  }
  decoder_step(s, ci_f, nullptr);
  return true;
}

const char* kStatusText[] = {
    "ok",
    "invalid argument",
    "cannot read the model file",
    "not an lfads_fast real-time model file, or a truncated or corrupt one",
    "the model file was written by a newer format version than this library reads",
    "unsupported model or mode",
    "wrong number of channels",
    "NaN or infinite count",
    "negative count",
    "count above max_count",
    "out of memory",
};

void set_err(char* err, size_t len, const std::string& msg) {
  if (!err || len == 0) return;
  const size_t n = std::min(len - 1, msg.size());
  std::memcpy(err, msg.data(), n);
  err[n] = '\0';
}

// ---------------------------------------------------------------------------- loading

struct Loader {
  const lfads::rt::SafetensorsFile& file;
  std::string err;

  const lfads::rt::Tensor* tensor(const std::string& name, std::initializer_list<int64_t> shape) {
    auto it = file.tensors.find(name);
    if (it == file.tensors.end()) {
      err = "tensor '" + name + "' is missing";
      return nullptr;
    }
    if (!std::equal(shape.begin(), shape.end(), it->second.shape.begin(), it->second.shape.end())) {
      std::string want, got;
      for (int64_t d : shape) want += (want.empty() ? "" : ", ") + std::to_string(d);
      for (int64_t d : it->second.shape) got += (got.empty() ? "" : ", ") + std::to_string(d);
      err = "tensor '" + name + "' has shape [" + got + "], the config needs [" + want + "]";
      return nullptr;
    }
    return &it->second;
  }
};

// Columns [c0, c0 + nc) of a row-major [rows][cols] matrix, transposed into
// dst[(k) * ld + dst_col + r] for k < nc, r < rows.
void put_transposed(const float* src, int rows, int cols, int c0, int nc, float* dst, int ld,
                    int dst_col) {
  for (int r = 0; r < rows; ++r)
    for (int k = 0; k < nc; ++k)
      dst[static_cast<int64_t>(k) * ld + dst_col + r] = src[static_cast<int64_t>(r) * cols + c0 + k];
}

std::vector<float> transposed(const float* src, int rows, int cols, int c0, int nc, int r0 = 0,
                              int nr = -1) {
  if (nr < 0) nr = rows - r0;
  std::vector<float> out(static_cast<size_t>(nc) * nr);
  put_transposed(src + static_cast<int64_t>(r0) * cols, nr, cols, c0, nc, out.data(), nr, 0);
  return out;
}

bool get_int(const Json& cfg, const char* key, int lo, int* out, std::string* err, bool optional = false,
             int dflt = 0) {
  const Json* v = cfg.get(key);
  if (!v || v->kind == Json::Null) {
    if (optional) {
      *out = dflt;
      return true;
    }
    *err = std::string("config lacks ") + key;
    return false;
  }
  if (v->kind != Json::Number || v->num != std::floor(v->num) || v->num < lo || v->num > 1e8) {
    *err = std::string("config field ") + key + " is not an integer >= " + std::to_string(lo);
    return false;
  }
  *out = static_cast<int>(v->num);
  return true;
}

lfrt_status load_model(const char* path, Model* m, std::string* err) {
  lfads::rt::SafetensorsFile file;
  const auto rc = lfads::rt::read_safetensors(path, &file, err);
  if (rc == lfads::rt::ReadError::Io) return LFRT_ERR_IO;
  if (rc != lfads::rt::ReadError::None) return LFRT_ERR_FORMAT;
  auto meta = [&](const char* k) -> const std::string* {
    auto it = file.metadata.find(k);
    return it == file.metadata.end() ? nullptr : &it->second;
  };
  const std::string* fmt = meta("format");
  if (!fmt || *fmt != "lfads_fast.realtime") {
    *err = "a safetensors file, but not an lfads_fast real-time model (metadata format is " +
           (fmt ? "'" + *fmt + "'" : std::string("missing")) + "; write one with lfads-fast export)";
    return LFRT_ERR_FORMAT;
  }
  const std::string* ver = meta("format_version");
  char* end = nullptr;
  const long v = ver ? std::strtol(ver->c_str(), &end, 10) : 0;
  if (!ver || end == ver->c_str() || *end != '\0' || v < 1) {
    *err = "metadata format_version is missing or not a positive integer";
    return LFRT_ERR_FORMAT;
  }
  if (v > LFRT_FORMAT_VERSION) {
    *err = "format_version " + std::to_string(v) + " is newer than this library reads (" +
           std::to_string(LFRT_FORMAT_VERSION) + "); update lfads_fast";
    return LFRT_ERR_VERSION;
  }
  m->format_version = static_cast<int>(v);
  const std::string* cfg_text = meta("config");
  Json cfg;
  std::string jerr;
  if (!cfg_text || !lfads::rt::parse_json(*cfg_text, &cfg, &jerr) || cfg.kind != Json::Object) {
    *err = "metadata config is missing or not a JSON object" + (jerr.empty() ? "" : ": " + jerr);
    return LFRT_ERR_FORMAT;
  }
  m->config_json = *cfg_text;
  int E = 0;
  if (!get_int(cfg, "encod_data_dim", 1, &m->Ne, err) || !get_int(cfg, "recon_data_dim", 1, &m->Nr, err) ||
      !get_int(cfg, "encod_seq_len", 1, &m->Te, err) || !get_int(cfg, "ext_input_dim", 0, &E, err) ||
      !get_int(cfg, "ic_enc_dim", 1, &m->Hi, err) || !get_int(cfg, "ci_enc_dim", 0, &m->Hc, err) ||
      !get_int(cfg, "ci_lag", 0, &m->lag, err) || !get_int(cfg, "con_dim", 0, &m->C, err) ||
      !get_int(cfg, "co_dim", 0, &m->U, err) || !get_int(cfg, "ic_dim", 1, &m->ic_dim, err) ||
      !get_int(cfg, "gen_dim", 1, &m->G, err) || !get_int(cfg, "fac_dim", 1, &m->F, err) ||
      !get_int(cfg, "ic_enc_seq_len", 0, &m->K, err, true, 0))
    return LFRT_ERR_FORMAT;
  const Json* clip = cfg.get("cell_clip");
  if (!clip || clip->kind != Json::Number || !(clip->num > 0)) {
    *err = "config field cell_clip is missing or not positive";
    return LFRT_ERR_FORMAT;
  }
  m->clip = static_cast<float>(clip->num);
  const Json* causal = cfg.get("ci_enc_causal");
  m->causal = causal && causal->kind == Json::Bool && causal->b;
  const Json* sessions = cfg.get("session_neurons");
  if (sessions && sessions->kind != Json::Null) {
    *err = "models of several sessions (session_neurons) are not supported in real time";
    return LFRT_ERR_UNSUPPORTED;
  }
  if (E > 0) {
    *err = "models with external inputs (ext_input_dim > 0) are not supported in real time";
    return LFRT_ERR_UNSUPPORTED;
  }
  if (m->U == 0) m->C = 0;  // no controller
  m->nci = m->C == 0 ? 0 : (m->causal ? 1 : 2);
  const int Ne = m->Ne, Hi = m->Hi, Hc = m->Hc, C = m->C, U = m->U, G = m->G, F = m->F;
  m->off_ci = 6 * Hi;
  m->P = 6 * Hi + 3 * m->nci * Hc;

  Loader ld{file, {}};
  const char* encs[4] = {"ic_enc_fwd", "ic_enc_bwd", "ci_enc_fwd", "ci_enc_bwd"};
  const int n_enc = 2 + m->nci;
  m->enc_Wt.assign(static_cast<size_t>(Ne) * m->P, 0.f);
  m->enc_b.assign(m->P, 0.f);
  int col = 0;
  for (int e = 0; e < n_enc; ++e) {
    const int H = e < 2 ? Hi : Hc;
    const std::string name = encs[e];
    auto Wih = ld.tensor(name + "_W_ih", {3 * H, Ne});
    auto bih = ld.tensor(name + "_b_ih", {3 * H});
    auto Whh = ld.tensor(name + "_W_hh", {3 * H, H});
    if (!Wih || !bih || !Whh) break;
    put_transposed(Wih->data.data(), 3 * H, Ne, 0, Ne, m->enc_Wt.data(), m->P, col);
    std::copy(bih->data.begin(), bih->data.end(), m->enc_b.begin() + col);
    m->enc_hh[e] = transposed(Whh->data.data(), 3 * H, H, 0, H);
    col += 3 * H;
  }
  auto ich0 = ld.err.empty() ? ld.tensor("ic_enc_h0", {2, Hi}) : nullptr;
  auto icl = ich0 ? ld.tensor("ic_linear_W", {2 * m->ic_dim, 2 * Hi}) : nullptr;
  auto iclb = icl ? ld.tensor("ic_linear_b", {2 * m->ic_dim}) : nullptr;
  auto g0W = iclb ? ld.tensor("ic_to_g0_W", {G, m->ic_dim}) : nullptr;
  auto g0b = g0W ? ld.tensor("ic_to_g0_b", {G}) : nullptr;
  auto facW = g0b ? ld.tensor("fac_W", {F, G}) : nullptr;
  auto roW = facW ? ld.tensor("readout_W", {m->Nr, F}) : nullptr;
  auto rob = roW ? ld.tensor("readout_b", {m->Nr}) : nullptr;
  auto genW = rob ? ld.tensor("gen_W_ih", {3 * G, U}) : nullptr;  // U = 0 without controller
  auto genb = genW ? ld.tensor("gen_b_ih", {3 * G}) : nullptr;
  auto genhh = genb ? ld.tensor("gen_W_hh", {3 * G, G}) : nullptr;
  if (!genhh) {
    *err = ld.err;
    return LFRT_ERR_FORMAT;
  }
  m->enc_h0[0].assign(ich0->data.begin(), ich0->data.begin() + Hi);
  m->enc_h0[1].assign(ich0->data.begin() + Hi, ich0->data.end());
  m->icm_Wt = transposed(icl->data.data(), 2 * m->ic_dim, 2 * Hi, 0, 2 * Hi, 0, m->ic_dim);
  m->icm_b.assign(iclb->data.begin(), iclb->data.begin() + m->ic_dim);
  m->g0_Wt = transposed(g0W->data.data(), G, m->ic_dim, 0, m->ic_dim);
  m->g0_b = g0b->data;
  std::vector<float> fac = facW->data;  // rows normalised to unit length, as in training
  for (int r = 0; r < F; ++r) {
    double ss = 0;
    for (int k = 0; k < G; ++k) ss += double(fac[r * G + k]) * fac[r * G + k];
    const float norm = static_cast<float>(std::sqrt(ss));
    for (int k = 0; k < G; ++k) fac[r * G + k] /= norm;
  }
  m->fac_Wt = transposed(fac.data(), F, G, 0, G);
  m->ro_Wt = transposed(roW->data.data(), m->Nr, F, 0, F);
  m->ro_b = rob->data;
  m->gen_u_Wt = transposed(genW->data.data(), 3 * G, U, 0, U);
  m->gen_b = genb->data;
  m->gen_hh = transposed(genhh->data.data(), 3 * G, G, 0, G);
  if (C > 0) {
    const int nci = m->nci;
    auto cih0 = ld.tensor("ci_enc_h0", {nci, Hc});
    auto conW = cih0 ? ld.tensor("con_W_ih", {3 * C, nci * Hc + F}) : nullptr;
    auto conb = conW ? ld.tensor("con_b_ih", {3 * C}) : nullptr;
    auto conhh = conb ? ld.tensor("con_W_hh", {3 * C, C}) : nullptr;
    auto conh0 = conhh ? ld.tensor("con_h0", {C}) : nullptr;
    auto coW = conh0 ? ld.tensor("co_linear_W", {2 * U, C}) : nullptr;
    auto cob = coW ? ld.tensor("co_linear_b", {2 * U}) : nullptr;
    if (!cob) {
      *err = ld.err;
      return LFRT_ERR_FORMAT;
    }
    for (int e = 0; e < nci; ++e)
      m->enc_h0[2 + e].assign(cih0->data.begin() + e * Hc, cih0->data.begin() + (e + 1) * Hc);
    m->con_ci_Wt = transposed(conW->data.data(), 3 * C, nci * Hc + F, 0, nci * Hc);
    m->con_f_Wt = transposed(conW->data.data(), 3 * C, nci * Hc + F, nci * Hc, F);
    m->con_b = conb->data;
    m->con_hh = transposed(conhh->data.data(), 3 * C, C, 0, C);
    m->con_h0 = conh0->data;
    m->com_Wt = transposed(coW->data.data(), 2 * U, C, 0, C, 0, U);
    m->com_b.assign(cob->data.begin(), cob->data.begin() + U);
  }
  // Optional behaviour decoder.
  if (const std::string* dec = meta("decoder")) {
    Json dj;
    std::string derr;
    if (!lfads::rt::parse_json(*dec, &dj, &derr) || dj.kind != Json::Object) {
      *err = "metadata decoder is not a JSON object";
      return LFRT_ERR_FORMAT;
    }
    const Json* feats = dj.get("features");
    if (!feats || feats->kind != Json::String || (feats->str != "rates" && feats->str != "factors")) {
      *err = "metadata decoder.features must be 'rates' or 'factors'";
      return LFRT_ERR_FORMAT;
    }
    m->dec_on_rates = feats->str == "rates";
    if (!get_int(dj, "lag", 0, &m->dec_lag, err) || !get_int(dj, "n_outputs", 1, &m->D, err)) return LFRT_ERR_FORMAT;
    const int nf = m->dec_on_rates ? m->Nr : F;
    auto dW = ld.tensor("decoder_W", {m->D, nf});
    auto db = dW ? ld.tensor("decoder_b", {m->D}) : nullptr;
    if (!db) {
      *err = ld.err;
      return LFRT_ERR_FORMAT;
    }
    m->dec_Wt = transposed(dW->data.data(), m->D, nf, 0, nf);
    m->dec_b = db->data;
  }
  return LFRT_OK;
}

// ---------------------------------------------------------------------------- state layout

// Carves the state's arrays out of mem in order; with mem == nullptr only counts the bytes.
struct Carver {
  char* base;
  size_t used = 0;
  float* take(size_t n) {
    used = (used + LFRT_STATE_ALIGN - 1) / LFRT_STATE_ALIGN * LFRT_STATE_ALIGN;
    float* p = base ? reinterpret_cast<float*>(base + used) : nullptr;
    used += n * sizeof(float);
    return p;
  }
};

// Why a model cannot stream, or nullptr when it can (the one rule for the options check and
// lfrt_model_get_info).
const char* streaming_problem(const Model& m) {
  if (m.K < 1)
    return "streaming needs a model trained with ic_enc_seq_len >= 1 (the initial condition from "
           "the first bins); this one encodes it from the whole trial: use window mode";
  if (m.C > 0 && !m.causal)
    return "streaming needs a model trained with ci_enc_causal (a forward-only controller-input "
           "encoder); this one has a bidirectional one: use window mode";
  return nullptr;
}

bool check_options(const Model& m, const lfrt_options& o, lfrt_options* norm, std::string* err) {
  *norm = o;
  if (o.mode == LFRT_MODE_WINDOW) {
    norm->window = o.window == 0 ? m.Te : o.window;
    if (norm->window < 1 || norm->window > 100000) {
      *err = "window must be in 1 .. 100000 (0: the model's encod_seq_len), got " + std::to_string(o.window);
      return false;
    }
    if (o.lookahead < 0 || o.lookahead >= norm->window) {
      *err = "lookahead must be in 0 .. window - 1 = " + std::to_string(norm->window - 1) + ", got " +
             std::to_string(o.lookahead);
      return false;
    }
  } else if (o.mode == LFRT_MODE_STREAMING) {
    if (const char* problem = streaming_problem(m)) {
      *err = problem;
      return false;
    }
    if (o.window != 0 || o.lookahead != 0) {
      *err = "window and lookahead belong to window mode; leave them 0 for streaming";
      return false;
    }
    norm->window = 0;
  } else {
    *err = "mode must be LFRT_MODE_WINDOW (0) or LFRT_MODE_STREAMING (1), got " + std::to_string(o.mode);
    return false;
  }
  if (!(o.max_count >= 0) || std::isinf(o.max_count)) {
    *err = "max_count must be a finite number >= 0 (0: 1000)";
    return false;
  }
  if (norm->max_count == 0) norm->max_count = 1000.f;
  return true;
}

size_t layout(const Model& m, const lfrt_options& o, char* mem, lfrt_state** out) {
  Carver cv{mem};
  cv.used = sizeof(lfrt_state);
  const int Hmax = std::max({m.Hi, m.Hc, m.C, m.G});
  const bool window = o.mode == LFRT_MODE_WINDOW;
  const int rows = window ? o.window : std::max(m.K, 1);
  lfrt_state tmp{};
  lfrt_state* s = mem ? reinterpret_cast<lfrt_state*>(mem) : &tmp;
  if (mem) std::memset(s, 0, sizeof(lfrt_state));
  s->xring = cv.take(static_cast<size_t>(rows) * m.P);
  s->hf = cv.take(Hmax);
  s->hb = cv.take(Hmax);
  s->hnew = cv.take(2 * Hmax);
  s->tmp = cv.take(4 * Hmax);
  const size_t ci_rows = window ? o.window : m.lag + 1;
  s->cf = cv.take(ci_rows * std::max(m.Hc, 1));
  s->cb = cv.take(window && !m.causal ? ci_rows * std::max(m.Hc, 1) : 1);
  s->ci_h = cv.take(std::max(m.Hc, 1));
  s->icm = cv.take(m.ic_dim);
  s->c = cv.take(std::max(m.C, 1));
  s->g = cv.take(m.G);
  s->f = cv.take(m.F);
  s->xc = cv.take(3 * std::max(m.C, 1));
  s->xg = cv.take(3 * m.G);
  s->u = cv.take(std::max(m.U, 1));
  s->rates = cv.take(m.Nr);
  s->feat = cv.take(static_cast<size_t>(m.dec_lag + 1) * (m.dec_on_rates ? m.Nr : m.F));
  if (out) *out = s;
  return cv.used;
}

// Validates a bin without touching the state; writes the problem to s->err.
lfrt_status check_bin(lfrt_state* s, const float* counts, int32_t n) {
  const Model& m = *s->m;
  if (n != m.Ne) {
    std::snprintf(s->err, sizeof(s->err), "counts has %d channels, the model expects %d", int(n), m.Ne);
    return LFRT_ERR_CHANNELS;
  }
  for (int i = 0; i < n; ++i) {
    const float x = counts[i];
    if (!std::isfinite(x)) {
      std::snprintf(s->err, sizeof(s->err), "counts[%d] is %s", i, std::isnan(x) ? "NaN" : "infinite");
      return LFRT_ERR_NAN;
    }
    if (x < 0.f) {
      std::snprintf(s->err, sizeof(s->err), "counts[%d] is negative (%g)", i, double(x));
      return LFRT_ERR_NEGATIVE;
    }
    if (x > s->max_count) {
      std::snprintf(s->err, sizeof(s->err), "counts[%d] = %g is above max_count %g", i, double(x),
                    double(s->max_count));
      return LFRT_ERR_HUGE;
    }
  }
  return LFRT_OK;
}

void write_outputs(lfrt_state* s, int64_t out_bin, lfrt_output* out) {
  const Model& m = *s->m;
  for (int n = 0; n < m.Nr; ++n) s->rates[n] = m.ro_b[n];
  matvec_acc(m.F, m.Nr, m.ro_Wt.data(), m.Nr, s->f, s->rates);
  // The vectorisable exp of the training kernels (about 2 ulp), not glibc's scalar expf.
#pragma omp simd
  for (int n = 0; n < m.Nr; ++n) s->rates[n] = lfads::lf_exp(s->rates[n]);
  if (out->rates) std::memcpy(out->rates, s->rates, sizeof(float) * m.Nr);
  if (out->factors) std::memcpy(out->factors, s->f, sizeof(float) * m.F);
  if (m.D > 0) {
    const int nf = m.dec_on_rates ? m.Nr : m.F;
    const int R = m.dec_lag + 1;
    std::memcpy(s->feat + (out_bin % R) * nf, m.dec_on_rates ? s->rates : s->f, sizeof(float) * nf);
    if (out->decoded) {
      // The first output is bin W - 1 - L (window) or K - 1 (streaming).
      const int64_t first_out = s->mode == LFRT_MODE_WINDOW ? s->W - 1 - s->L : m.K - 1;
      if (out_bin - m.dec_lag >= first_out) {
        std::memcpy(out->decoded, m.dec_b.data(), sizeof(float) * m.D);
        matvec_acc(nf, m.D, m.dec_Wt.data(), m.D, s->feat + ((out_bin - m.dec_lag) % R) * nf, out->decoded);
      } else {
        for (int d = 0; d < m.D; ++d) out->decoded[d] = std::nanf("");
      }
    }
  }
  out->bin = out_bin;
  out->ready = 1;
}

}  // namespace

// ---------------------------------------------------------------------------- API

extern "C" {

const char* lfrt_status_string(lfrt_status status) {
  const int i = static_cast<int>(status);
  if (i < 0 || i >= static_cast<int>(sizeof(kStatusText) / sizeof(kStatusText[0]))) return "unknown status";
  return kStatusText[i];
}

lfrt_status lfrt_model_load(const char* path, lfrt_model** model, char* err, size_t err_len) {
  if (model) *model = nullptr;
  if (!path || !model) {
    set_err(err, err_len, "path and model must not be NULL");
    return LFRT_ERR_ARGUMENT;
  }
  try {
    auto* h = new lfrt_model;
    std::string msg;
    const lfrt_status st = load_model(path, &h->m, &msg);
    if (st != LFRT_OK) {
      delete h;
      set_err(err, err_len, std::string(path) + ": " + msg);
      return st;
    }
    *model = h;
    set_err(err, err_len, "");
    return LFRT_OK;
  } catch (const std::bad_alloc&) {
    set_err(err, err_len, std::string(path) + ": out of memory");
    return LFRT_ERR_MEMORY;
  } catch (...) {
    set_err(err, err_len, std::string(path) + ": unexpected error while loading");
    return LFRT_ERR_FORMAT;
  }
}

void lfrt_model_free(lfrt_model* model) { delete model; }

lfrt_status lfrt_model_get_info(const lfrt_model* model, lfrt_model_info* info) {
  if (!model || !info) return LFRT_ERR_ARGUMENT;
  const Model& m = model->m;
  info->n_in = m.Ne;
  info->n_out = m.Nr;
  info->n_factors = m.F;
  info->n_decoded = m.D;
  info->seq_len = m.Te;
  info->ic_enc_seq_len = m.K;
  info->streaming = streaming_problem(m) == nullptr;
  info->format_version = m.format_version;
  return LFRT_OK;
}

const char* lfrt_model_config_json(const lfrt_model* model) {
  return model ? model->m.config_json.c_str() : "";
}

size_t lfrt_state_size(const lfrt_model* model, const lfrt_options* options, char* err, size_t err_len) {
  if (!model || !options) {
    set_err(err, err_len, "model and options must not be NULL");
    return 0;
  }
  lfrt_options o;
  std::string msg;
  if (!check_options(model->m, *options, &o, &msg)) {
    set_err(err, err_len, msg);
    return 0;
  }
  return layout(model->m, o, nullptr, nullptr);
}

lfrt_status lfrt_state_init(const lfrt_model* model, const lfrt_options* options, void* mem,
                            size_t size, lfrt_state** state) {
  if (state) *state = nullptr;
  if (!model || !options || !mem || !state) return LFRT_ERR_ARGUMENT;
  if (reinterpret_cast<uintptr_t>(mem) % LFRT_STATE_ALIGN != 0) return LFRT_ERR_ARGUMENT;
  lfrt_options o;
  std::string msg;
  if (!check_options(model->m, *options, &o, &msg)) return LFRT_ERR_ARGUMENT;
  if (size < layout(model->m, o, nullptr, nullptr)) return LFRT_ERR_ARGUMENT;
  lfrt_state* s;
  layout(model->m, o, static_cast<char*>(mem), &s);
  s->m = &model->m;
  s->mode = o.mode;
  s->W = o.window;
  s->L = o.lookahead;
  s->max_count = o.max_count;
  lfrt_reset(s);
  *state = s;
  return LFRT_OK;
}

lfrt_status lfrt_reset(lfrt_state* s) {
  if (!s) return LFRT_ERR_ARGUMENT;
  s->bin = 0;
  s->head = 0;
  s->err[0] = '\0';
  return LFRT_OK;
}

lfrt_status lfrt_step(lfrt_state* s, const float* counts, int32_t n_channels, lfrt_output* out) {
  if (!s || !out || (!counts && n_channels > 0)) {
    if (s) std::snprintf(s->err, sizeof(s->err), "state, counts and out must not be NULL");
    return LFRT_ERR_ARGUMENT;
  }
  out->ready = 0;
  out->bin = -1;
  const lfrt_status st = check_bin(s, counts, n_channels);
  if (st != LFRT_OK) return st;
  const Model& m = *s->m;
  const int64_t t = s->bin;
  float* row;
  if (s->mode == LFRT_MODE_WINDOW) {
    row = s->xring + static_cast<int64_t>(s->head) * m.P;
    s->head = (s->head + 1) % s->W;  // now the slot of the oldest bin
  } else {
    row = s->xring + (t < m.K ? t : 0) * m.P;
  }
  // This bin's input projection for all encoders (streaming after the IC: the CI columns).
  const int c0 = (s->mode == LFRT_MODE_STREAMING && t >= m.K) ? m.off_ci : 0;
  std::memcpy(row + c0, m.enc_b.data() + c0, sizeof(float) * (m.P - c0));
  matvec_acc_sparse(m.Ne, m.P - c0, m.enc_Wt.data() + c0, m.P, counts, row + c0);
  s->bin = t + 1;
  if (s->mode == LFRT_MODE_WINDOW) {
    if (t + 1 < s->W) return LFRT_OK;
    window_forward(s);
    write_outputs(s, t - s->L, out);
  } else {
    if (!streaming_step(s, t)) return LFRT_OK;
    write_outputs(s, t, out);
  }
  return LFRT_OK;
}

const char* lfrt_state_error(const lfrt_state* s) { return s ? s->err : "state is NULL"; }

}  // extern "C"
