// Test hooks of the extension. DFM_FUSED_POISON is read once, when the library is loaded;
// tests switch it afterwards with set_poison (dfm_fused._extension.set_poison), not through
// the environment.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "common.h"

namespace dfm_fused {
namespace {

bool poison_from_environment() {
  const char* value = std::getenv("DFM_FUSED_POISON");
  return value != nullptr && std::strcmp(value, "1") == 0;
}

std::atomic<bool> poison{poison_from_environment()};

}  // namespace

void set_poison(bool enabled) { poison.store(enabled, std::memory_order_relaxed); }

bool poison_enabled() { return poison.load(std::memory_order_relaxed); }

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  at::Tensor out = at::empty(sizes, options.memory_format(format));
  if (poison_enabled()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

}  // namespace dfm_fused
