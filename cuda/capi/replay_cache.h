// Eager calls replayed as CUDA graphs.
//
// On the GPU machines we measured, every kernel launch costs the host about
// 5 us (bench/bench_host.cu), so an FFN call of four to six launches spends
// 18-45 us on the host while the GPU needs 20-25 us at decode sizes; one
// cudaGraphLaunch of the same sequence costs about 2 us whatever its length.
// So a plan captures the launch sequence of a call (on its own stream, which
// nothing else uses) the second time it sees the same call -- same path, M,
// pointers, strides and workspace -- and replays the graph from then on. The
// first sighting runs eagerly (a call seen once costs nothing extra); a few
// graphs are kept per plan, least recently used out. A graph bakes in every
// pointer and every host-side decision of the launch sequence, and those are
// functions of the key and the device only, so a replay does exactly what
// the eager launches would.
//
// A capture or instantiation that fails turns replay off for the plan (the
// call then runs eagerly: slower, never wrong).
//
// No capture storms: a key counts as seen again only within the last
// `capacity` first sightings, so a cycle of more keys than the cache holds
// (several layers sharing one plan, say) runs eagerly instead of capturing
// and evicting at every call; and once the plan has captured twice its
// capacity with fewer than two replays per capture, it stops capturing (calls
// it holds a graph for still replay; the others run eagerly).
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_runtime.h>

#include "common/errors.h"

namespace twell {

struct ReplayKey {
  static constexpr int kWords = 32;
  uint64_t w[kWords] = {};
  int n = 0;
  bool overflow = false;  // more words than fit: never matched, the call runs eagerly
  void add(uint64_t v) {
    if (n < kWords) {
      w[n++] = v;
    } else {
      overflow = true;
    }
  }
  void add_ptr(const void* p) { add(reinterpret_cast<uintptr_t>(p)); }
  bool operator==(const ReplayKey& o) const { return n == o.n && std::memcmp(w, o.w, sizeof(uint64_t) * n) == 0; }
};

class ReplayCache {
 public:
  static constexpr int kDefaultGraphs = 8;
  static constexpr int kMaxGraphs = 64;

  ReplayCache() = default;
  ReplayCache(const ReplayCache&) = delete;
  ReplayCache& operator=(const ReplayCache&) = delete;
  ~ReplayCache() { clear(); }

  int capacity() const { return capacity_; }
  // The C ABI's twell_*_plan_set_replay / _replay_counts (the plan checked by the caller).
  twell_status set_capacity_checked(int32_t max_graphs) {
    if (max_graphs < 0 || max_graphs > kMaxGraphs) {
      return fail(TWELL_ERROR_INVALID_ARGUMENT, "max_graphs is %d, expected 0 (off) .. %d", max_graphs, kMaxGraphs);
    }
    set_capacity(max_graphs);
    return TWELL_SUCCESS;
  }
  void counts(int64_t* replays, int64_t* captures) const {
    if (replays != nullptr) *replays = replays_;
    if (captures != nullptr) *captures = captures_;
  }
  void set_capacity(int n) {
    capacity_ = n < 0 ? 0 : (n > kMaxGraphs ? kMaxGraphs : n);
    clear();
  }
  void clear() {
    for (int i = 0; i < count_; ++i) {
      if (entries_[i].exec != nullptr) (void)cudaGraphExecDestroy(entries_[i].exec);  // freed once idle
    }
    count_ = 0;
    seen_count_ = 0;
    seen_next_ = 0;
    stopped_ = false;
  }
  // Replays of cached graphs so far, and graphs captured so far.
  int64_t replays() const { return replays_; }
  int64_t captures() const { return captures_; }

  // Runs launch(stream-to-launch-on) for `key` on `stream`: as a replay of the
  // key's graph, or eagerly (first sighting, replay off), or captured now
  // through `side` and then replayed (second sighting).
  template <class Launch>
  twell_status run(const ReplayKey& key, cudaStream_t stream, cudaStream_t side, Launch&& launch) {
    if (capacity_ == 0 || side == nullptr || key.overflow) return launch(stream);
    ++tick_;
    for (int i = 0; i < count_; ++i) {
      if (entries_[i].key == key) {
        entries_[i].used = tick_;
        ++replays_;
        cudaError_t err = cudaGraphLaunch(entries_[i].exec, stream);
        return err == cudaSuccess ? TWELL_SUCCESS : fail_cuda(err, "replaying the call's CUDA graph");
      }
    }
    if (stopped_ || !seen_before(key)) return launch(stream);
    cudaGraphExec_t exec = nullptr;
    const twell_status st = capture(side, launch, &exec);
    if (st != TWELL_SUCCESS) return st;  // a launch error, as eagerly
    if (exec == nullptr) {               // the capture itself failed: no replay for this plan
      capacity_ = 0;
      return launch(stream);
    }
    insert(key, exec);
    ++replays_;
    if (captures_ >= 2 * static_cast<int64_t>(capacity_) && replays_ < 2 * captures_) stopped_ = true;
    cudaError_t err = cudaGraphLaunch(exec, stream);
    return err == cudaSuccess ? TWELL_SUCCESS : fail_cuda(err, "replaying the call's CUDA graph");
  }

 private:
  struct Entry {
    ReplayKey key;
    cudaGraphExec_t exec = nullptr;
    uint64_t used = 0;
  };

  // Whether `key` is among the last `capacity_` first sightings (else it becomes one).
  bool seen_before(const ReplayKey& key) {
    for (int i = 0; i < seen_count_; ++i) {
      if (seen_[i] == key) return true;
    }
    seen_[seen_next_] = key;
    seen_next_ = (seen_next_ + 1) % capacity_;
    if (seen_count_ < capacity_) ++seen_count_;
    return false;
  }

  template <class Launch>
  twell_status capture(cudaStream_t side, Launch& launch, cudaGraphExec_t* exec) {
    *exec = nullptr;
    if (cudaStreamBeginCapture(side, cudaStreamCaptureModeRelaxed) != cudaSuccess) {
      (void)cudaGetLastError();
      return TWELL_SUCCESS;
    }
    const twell_status st = launch(side);
    cudaGraph_t graph = nullptr;
    const cudaError_t end = cudaStreamEndCapture(side, &graph);
    if (st != TWELL_SUCCESS || end != cudaSuccess || graph == nullptr) {
      if (graph != nullptr) (void)cudaGraphDestroy(graph);
      (void)cudaGetLastError();
      return st;
    }
    const cudaError_t inst = cudaGraphInstantiate(exec, graph, 0);
    (void)cudaGraphDestroy(graph);
    if (inst != cudaSuccess) {
      (void)cudaGetLastError();
      *exec = nullptr;
      return TWELL_SUCCESS;
    }
    ++captures_;
    return TWELL_SUCCESS;
  }

  void insert(const ReplayKey& key, cudaGraphExec_t exec) {
    int slot = count_;
    if (count_ == capacity_) {  // evict the least recently used
      slot = 0;
      for (int i = 1; i < count_; ++i) {
        if (entries_[i].used < entries_[slot].used) slot = i;
      }
      (void)cudaGraphExecDestroy(entries_[slot].exec);
    } else {
      ++count_;
    }
    entries_[slot].key = key;
    entries_[slot].exec = exec;
    entries_[slot].used = tick_;
  }

  int capacity_ = kDefaultGraphs;
  Entry entries_[kMaxGraphs];
  int count_ = 0;
  ReplayKey seen_[kMaxGraphs];
  int seen_count_ = 0, seen_next_ = 0;
  bool stopped_ = false;  // captures stopped (a storm: see the top of the file)
  uint64_t tick_ = 0;
  int64_t replays_ = 0, captures_ = 0;
};

}  // namespace twell
