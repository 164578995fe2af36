// Bindings of the decoder op.
#include "bindings_util.h"

namespace lfads {
void register_decoder(py::module_& m) {}
}  // namespace lfads
