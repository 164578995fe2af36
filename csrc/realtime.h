// Internals of the real-time library (include/lfads_fast/realtime.h is the public API).
//
// Sizes (common.h names): N_in = N_e input channels, N_out = N_r rate channels, Hi IC-encoder
// units, Hc CI-encoder units, nci = 1 (causal) or 2 CI-encoder directions, C controller units,
// U controller outputs, G generator units, F factors, D decoded outputs, P = 3 (2 Hi + nci Hc)
// columns of the encoders' stacked input projection.
// Every weight is stored TRANSPOSED, [inputs][outputs], so that a batch-1 product is a sum of
// rows scaled by the inputs: y += x_k W[k, :], a loop over contiguous outputs that vectorises
// without reassociating sums and that skips zero inputs (most bins of spike counts are 0).
#pragma once

#include <string>
#include <vector>

#include "lfads_fast/realtime.h"

namespace lfads {
namespace rt {

struct Model {
  int Ne = 0, Nr = 0, Te = 0, Hi = 0, Hc = 0, nci = 0, C = 0, U = 0, G = 0, F = 0, ic_dim = 0;
  int lag = 0;      // ci_lag
  int K = 0;        // ic_enc_seq_len (0: the IC encoder sees every bin)
  bool causal = false;  // ci_enc_causal
  float clip = 5.f;
  int P = 0;        // columns of the encoders' input projection
  int off_ci = 0;   // first column of the CI encoder(s) in it: 6 Hi
  int format_version = 0;
  std::string config_json;

  std::vector<float> enc_Wt;   // [N_e][P]  encoder input weights, order ic fwd, ic bwd, ci fwd[, ci bwd]
  std::vector<float> enc_b;    // [P]
  std::vector<float> enc_hh[4];  // [H][3H] each
  std::vector<float> enc_h0[4];  // [H] each
  std::vector<float> icm_Wt;   // [2 Hi][ic_dim]  the mean rows of ic_linear
  std::vector<float> icm_b;    // [ic_dim]
  std::vector<float> g0_Wt;    // [ic_dim][G]
  std::vector<float> g0_b;     // [G]
  std::vector<float> fac_Wt;   // [G][F]  row-normalised fac_W, transposed
  std::vector<float> con_ci_Wt;  // [nci Hc][3C]
  std::vector<float> con_f_Wt;   // [F][3C]
  std::vector<float> con_b;      // [3C]
  std::vector<float> con_hh;     // [C][3C]
  std::vector<float> con_h0;     // [C]
  std::vector<float> com_Wt;     // [C][U]  the mean rows of co_linear
  std::vector<float> com_b;      // [U]
  std::vector<float> gen_u_Wt;   // [U][3G]
  std::vector<float> gen_b;      // [3G]
  std::vector<float> gen_hh;     // [G][3G]
  std::vector<float> ro_Wt;      // [F][N_r]
  std::vector<float> ro_b;       // [N_r]
  // Linear read-out of behaviour fitted on rates or factors (lfads-fast fit-decoder).
  int D = 0;                 // outputs; 0 = none
  int dec_lag = 0;           // decoded_t = W feat_{t - dec_lag} + b
  bool dec_on_rates = false; // features: rates (else factors)
  std::vector<float> dec_Wt; // [features][D]
  std::vector<float> dec_b;  // [D]
};

}  // namespace rt
}  // namespace lfads

struct lfrt_model {
  lfads::rt::Model m;
};
