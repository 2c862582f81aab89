// A small pool of worker threads for the CPU attention kernel.
//
// MLX runs every CPU primitive as one task on its stream's scheduler thread;
// this pool lets one primitive use every core. The calling thread takes parts
// too, so with one thread (MLX_KVQ_THREADS=1, or a one-core machine) a job
// runs inline with no thread traffic. Parts are taken from an atomic counter,
// so a slow core delays a job by at most one part. Workers park on a
// condition variable between jobs (no spinning: the model's other ops and
// BLAS need the cores between attention calls).
//
// The pool lives for the process and is never destroyed: its threads wait on
// a condition variable that the process's exit ends, so interpreter shutdown
// never joins or destroys a running thread.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace kvq {

class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed (see above)
    return *pool;
  }

  static int default_threads() {
    int n = static_cast<int>(std::thread::hardware_concurrency());
    if (const char* env = std::getenv("MLX_KVQ_THREADS")) {
      int v = std::atoi(env);
      if (v > 0) {
        n = v;
      }
    }
    return std::clamp(n, 1, 256);
  }

  int threads() const {
    return static_cast<int>(workers_.size()) + 1;
  }

  // fn(part) for every part in [0, n_parts); returns when all have run.
  // Not reentrant: called from one thread at a time (MLX's CPU stream).
  void run(int n_parts, const std::function<void(int)>& fn) {
    if (n_parts <= 0) {
      return;
    }
    if (n_parts == 1 || workers_.empty()) {
      for (int p = 0; p < n_parts; ++p) {
        fn(p);
      }
      return;
    }
    auto job = std::make_shared<Job>();
    job->fn = fn;
    job->parts = n_parts;
    {
      std::lock_guard<std::mutex> lk(m_);
      job_ = job;
      ++generation_;
    }
    cv_.notify_all();
    work(*job);
    std::unique_lock<std::mutex> lk(m_);
    done_cv_.wait(lk, [&] { return job->done.load() >= job->parts; });
  }

 private:
  struct Job {
    std::function<void(int)> fn;
    int parts = 0;
    std::atomic<int> next{0};
    std::atomic<int> done{0};
  };

  Pool() {
    for (int i = 1; i < default_threads(); ++i) {
      workers_.emplace_back([this] { loop(); });
      workers_.back().detach();
    }
  }

  void work(Job& job) {
    int p;
    while ((p = job.next.fetch_add(1)) < job.parts) {
      job.fn(p);
      if (job.done.fetch_add(1) + 1 == job.parts) {
        std::lock_guard<std::mutex> lk(m_);
        done_cv_.notify_all();
      }
    }
  }

  void loop() {
    std::uint64_t seen = 0;
    while (true) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;
      }
      if (job) {
        work(*job);
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex m_;
  std::condition_variable cv_;
  std::condition_variable done_cv_;
  std::shared_ptr<Job> job_;
  std::uint64_t generation_ = 0;
};

}  // namespace kvq
