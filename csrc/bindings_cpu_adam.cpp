// Bindings of the adam op.
#include "bindings_util.h"

namespace lfads {
void register_adam(py::module_& m) {}
}  // namespace lfads
