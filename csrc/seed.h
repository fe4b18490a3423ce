// The dropout seed: the [key, offset] pair that torch.randint(0, 2**63 - 1, (2,)) would draw from torch's default
// CPU generator, so torch.manual_seed reproduces it.
#pragma once
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>

#include <cstdint>
#include <mutex>
#include <utility>

namespace fastfuse {

inline std::pair<int64_t, int64_t> draw_seed() {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  auto* g = at::check_generator<at::CPUGeneratorImpl>(gen);
  // randint's int64 rule for a range of 2^32 or more: one random64() per value, modulo the range
  constexpr uint64_t kRange = (uint64_t(1) << 63) - 1;
  const auto key = static_cast<int64_t>(g->random64() % kRange);
  const auto offset = static_cast<int64_t>(g->random64() % kRange);
  return {key, offset};
}

}  // namespace fastfuse
