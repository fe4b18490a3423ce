// The caching allocator of csrc/cpu/alloc.h.
//
// Freed blocks wait in a size-keyed free list until a request of the same rounded size takes them back.
// The idle total is capped (FASTFUSE_CPU_CACHE_MB, default 1024; 0 turns the cache off), so the cache can
// only hold on to memory the process already used, never more than the cap beyond what is live.
#include "alloc.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastfuse {
namespace {

constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kSmallStep = size_t(64) << 10;  // size classes below kHuge: multiples of 64 KB

// Blocks of 2 MB and more are 2 MB aligned and sized (huge pages); smaller ones round up to 64 KB.
size_t rounded(size_t nbytes) {
  const size_t step = nbytes >= kHuge ? kHuge : kSmallStep;
  return (nbytes + step - 1) / step * step;
}

size_t cache_cap_bytes() {
  const char* env = std::getenv("FASTFUSE_CPU_CACHE_MB");
  const long long mb = env ? std::atoll(env) : 1024;
  return mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
}

class OutputAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes == 0) return {nullptr, nullptr, &release, c10::Device(c10::DeviceType::CPU)};
    const size_t size = rounded(nbytes), align = size >= kHuge ? kHuge : 64;
    void* p = take(size);
    if (!p) {
      p = std::aligned_alloc(align, size);
      if (!p) {  // out of memory: give the idle blocks back and try once more
        empty();
        p = std::aligned_alloc(align, size);
      }
      TORCH_CHECK(p, "fastfuse: out of CPU memory allocating ", nbytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (size >= kHuge) madvise(p, size, MADV_HUGEPAGE);  // advice only: ignored where THP is off
#endif
      std::lock_guard<std::mutex> lock(mu_);
      live_[p] = size;
    }
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  int64_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(idle_);
  }

  void empty() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& kv : free_) {
      live_.erase(kv.second);
      std::free(kv.second);
    }
    free_.clear();
    idle_ = 0;
  }

  static OutputAllocator& get() {
    static OutputAllocator* a = new OutputAllocator();  // never destroyed: tensors may outlive static teardown
    return *a;
  }

 private:
  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(size);
    if (it == free_.end()) return nullptr;
    void* p = it->second;
    free_.erase(it);
    idle_ -= size;
    return p;
  }

  static void release(void* p) {
    if (p) get().give_back(p);
  }

  void give_back(void* p) {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t size = live_.at(p);
    if (idle_ + size <= cap_) {
      free_.emplace(size, p);
      idle_ += size;
    } else {
      live_.erase(p);
      std::free(p);
    }
  }

  std::mutex mu_;
  std::unordered_map<void*, size_t> live_;  // every block this allocator owns, with its rounded size
  std::multimap<size_t, void*> free_;       // the idle ones, by size
  size_t idle_ = 0;
  const size_t cap_ = cache_cap_bytes();
};

}  // namespace

c10::Allocator* output_allocator() { return &OutputAllocator::get(); }
int64_t cpu_cache_idle_bytes() { return OutputAllocator::get().idle_bytes(); }
void empty_cpu_cache() { OutputAllocator::get().empty(); }

}  // namespace fastfuse
