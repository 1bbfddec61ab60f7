// pxkern::reuse_cpu_memory: while enabled, CPU tensors of at least kMinReusedBytes come
// from a pool that keeps freed blocks for the next tensor of the same size.
//
// Why: PX scoring allocates dozens of activation-sized temporaries per stream (a
// [128, 16, 32, 32] float32 tensor is 8 MB), and glibc returns such blocks to the
// kernel when they are freed, so each new one costs ~2000 page faults: measured, a fresh
// torch.sign of 8 MB took 1.14 ms against 0.38 ms into an existing tensor. The shapes
// repeat in every stream and every pruning round, so a pool keyed by (rounded) size
// serves nearly every allocation after the first stream.
//
// Scope: enable/disable calls nest (a count); the first enable installs the pool as
// PyTorch's CPU allocator and the last disable puts the previous allocator back and frees
// every pooled block. Blocks still owned by tensors then go back to the system when those
// tensors die. If another allocator of higher priority is installed, enabling does
// nothing.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <mutex>
#include <unordered_map>
#include <vector>

namespace pxkern {
namespace {

// Smaller tensors are cheap to malloc (they come from the heap, not fresh pages).
constexpr size_t kMinReusedBytes = 256 * 1024;
// Sizes are rounded up to whole pages so that tensors of nearly equal size share blocks.
constexpr size_t kPageBytes = 4096;

struct Pool {
  std::mutex mutex;
  int depth = 0;
  c10::Allocator* previous = nullptr;
  std::unordered_map<size_t, std::vector<void*>> free_blocks;  // by rounded size
  std::unordered_map<void*, size_t> live_sizes;                // blocks owned by tensors
};

// Never destroyed: tensors holding pooled blocks may outlive everything else.
Pool& pool() {
  static Pool* instance = new Pool;
  return *instance;
}

// The deleter of every block the pool allocator hands out (also as raw_deleter, so it
// must take small blocks too: those are not pooled and go straight back).
void release(void* block) {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  const auto it = p.live_sizes.find(block);
  if (it != p.live_sizes.end() && p.depth > 0) {
    p.free_blocks[it->second].push_back(block);
  } else {
    c10::free_cpu(block);
  }
  if (it != p.live_sizes.end()) p.live_sizes.erase(it);
}

class PoolAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    Pool& p = pool();
    if (nbytes < kMinReusedBytes) {
      void* block = c10::alloc_cpu(nbytes);
      return {block, block, &release, c10::Device(c10::DeviceType::CPU)};
    }
    const size_t size = (nbytes + kPageBytes - 1) / kPageBytes * kPageBytes;
    void* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(p.mutex);
      auto& blocks = p.free_blocks[size];
      if (!blocks.empty()) {
        block = blocks.back();
        blocks.pop_back();
      }
    }
    if (block == nullptr) block = c10::alloc_cpu(size);
    {
      std::lock_guard<std::mutex> lock(p.mutex);
      p.live_sizes.emplace(block, size);
    }
    return {block, block, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

PoolAllocator& pool_allocator() {
  static PoolAllocator* instance = new PoolAllocator;
  return *instance;
}

void reuse_cpu_memory(bool enable) {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  if (enable) {
    if (p.depth++ > 0) return;
    p.previous = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&pool_allocator());
    return;
  }
  TORCH_CHECK(p.depth > 0, "reuse_cpu_memory(False) without a matching reuse_cpu_memory(True)");
  if (--p.depth > 0) return;
  if (c10::GetCPUAllocator() == &pool_allocator()) c10::SetCPUAllocator(p.previous);
  for (auto& [size, blocks] : p.free_blocks)
    for (void* block : blocks) c10::free_cpu(block);
  p.free_blocks.clear();
}

}  // namespace

TORCH_LIBRARY_IMPL(pxkern, CompositeExplicitAutograd, m) {
  m.impl("reuse_cpu_memory", &reuse_cpu_memory);
}

}  // namespace pxkern
