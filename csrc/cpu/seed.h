// The dropout seed drawn in C++: the [key, offset] pair that python/fastfuse/_rng.py's new_seed() draws
// (torch.randint(0, 2**63 - 1, (2,)) on torch's default CPU generator), without its Python and tensor round trip,
// which cost ~20 us per call in a fused eager path. test_eager_fast_path_equals_registered_op
// (tests/test_embedding_concat_dropout.py) checks that the two give the same masks.
#pragma once
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>
#include <c10/util/Optional.h>

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

// The (key, offset) an op was given, or for p > 0 without one, drawn (the fused eager paths pass None).
inline std::pair<int64_t, int64_t> seed_or_draw(c10::optional<int64_t> seed, c10::optional<int64_t> offset, double p) {
  return seed.has_value() || p <= 0 ? std::make_pair(seed.value_or(0), offset.value_or(0)) : draw_seed();
}

// An optional tensor that is None when undefined: autograd counts a defined one as an input.
inline c10::optional<at::Tensor> present(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t : c10::nullopt;
}

}  // namespace fastfuse
