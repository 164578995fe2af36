// Bindings of the elbo op.
#include "bindings_util.h"

namespace lfads {
void register_elbo(py::module_& m) {}
}  // namespace lfads
