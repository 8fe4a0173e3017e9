#pragma once
// Internal: a small persistent thread pool. Tasks are pulled from an atomic counter; which thread runs
// a task never changes what it computes, so results do not depend on the thread count.
//
// A layer call runs a few pool runs back to back, microseconds apart on many cores (a decoding step's
// stages), and waking a sleeping thread costs tens of microseconds (40 us for two threads on a VM). So
// the workers, after a run, and the caller, waiting for the workers, watch an atomic for up to
// `spin_time` before they sleep on a condition variable; each look pauses the core (and every 16th
// yields it, for machines with more threads than cores).

#include "moe/types.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>  // _mm_pause
#endif

namespace moe::detail {

/// Benchmarks: the seconds each task of each traced pool run took (`thread_pool::set_trace`), in one
/// array, so that tracing allocates nothing once `clear` has kept an earlier call's storage.
struct run_trace {
    std::vector<double> times;        // by run, then by task index
    std::vector<std::size_t> starts;  // where each run's tasks begin in `times`

    [[nodiscard]] std::size_t runs() const { return starts.size(); }
    /// The task times of run `r`.
    [[nodiscard]] std::span<const double> run(std::size_t r) const {
        const std::size_t end = r + 1 < starts.size() ? starts[r + 1] : times.size();
        return std::span<const double>(times).subspan(starts[r], end - starts[r]);
    }
    void clear() {  // keeps the storage
        times.clear();
        starts.clear();
    }
};

class thread_pool {
public:
    /// How long a thread watches for work (a worker) or for the workers to finish (the caller) before
    /// it sleeps.
    static constexpr std::chrono::microseconds spin_time{200};

    /// `threads` workers in all, the calling thread included. Each started thread first calls
    /// `on_start` when given (e.g. to allocate the thread-local scratch of the kernels it will run, so
    /// that no later call allocates; should it throw, the thread works on and its first product
    /// allocates instead).
    explicit thread_pool(index threads, void (*on_start)() = nullptr) {
        try {
            for (index w = 1; w < threads; ++w)
                workers_.emplace_back([this, w, on_start] {
                    if (on_start != nullptr) {
                        try {
                            on_start();
                        } catch (...) {  // NOLINT(bugprone-empty-catch): see above
                        }
                    }
                    work(w);
                });
        } catch (...) {
            stop_and_join();  // no destructor runs for a half-built pool: stop the workers started
            throw;
        }
    }
    thread_pool(const thread_pool&) = delete;
    thread_pool& operator=(const thread_pool&) = delete;
    ~thread_pool() { stop_and_join(); }

    [[nodiscard]] index size() const { return static_cast<index>(workers_.size()) + 1; }

    /// Runs f(task, thread) for every task in [0, tasks) and returns when all are done. `thread` is in
    /// [0, size()) and identifies per-thread scratch. Every task runs; the first exception a task
    /// throws is rethrown here.
    template <class F>
    void run(index tasks, F& f) {
        if (trace_ != nullptr) {
            trace_->starts.push_back(trace_->times.size());
            trace_->times.resize(trace_->times.size() + static_cast<std::size_t>(tasks), 0.0);
        }
        error_ = nullptr;
        if (workers_.empty() || tasks <= 1) {
            clock last = start_clock();
            for (index t = 0; t < tasks; ++t) {
                try {
                    f(t, 0);
                } catch (...) {
                    if (!error_) error_ = std::current_exception();
                }
                record(t, last);
            }
            if (error_) std::rethrow_exception(error_);
            return;
        }
        // Published to the workers by the generation's increment, which they read before any of it.
        call_ = [](void* ctx, index task, index thread) { (*static_cast<F*>(ctx))(task, thread); };
        context_ = &f;
        tasks_ = tasks;
        next_.store(0, std::memory_order_relaxed);
        busy_.store(static_cast<index>(workers_.size()), std::memory_order_relaxed);
        generation_.fetch_add(1, std::memory_order_seq_cst);
        {
            std::lock_guard lock(mutex_);  // a worker between its last look and its sleep holds it
        }
        wake_.notify_all();
        drain(0);
        if (!spin([this] { return busy_.load(std::memory_order_acquire) == 0; })) {
            std::unique_lock lock(mutex_);
            done_.wait(lock, [this] { return busy_.load(std::memory_order_acquire) == 0; });
        }
        if (error_) std::rethrow_exception(error_);
    }

    /// Benchmarks: while `trace` is set, every `run` appends the seconds each of its tasks took as one more
    /// run of `trace` (to list-schedule a task list for more threads than run it). A task's time runs from
    /// the end of the task its thread ran before (or from the thread's start on the run) to its own end:
    /// taking it from the counter and calling it are its cost, which the thread that runs it pays.
    void set_trace(run_trace* trace) { trace_ = trace; }

private:
    using clock = std::chrono::steady_clock::time_point;

    [[nodiscard]] clock start_clock() const { return trace_ != nullptr ? std::chrono::steady_clock::now() : clock{}; }

    // Traced: task `task` ended now, its thread's previous one at `last` (moved to now).
    void record(index task, clock& last) {
        if (trace_ == nullptr) return;
        const clock end = std::chrono::steady_clock::now();
        trace_->times[trace_->starts.back() + static_cast<std::size_t>(task)] =
            std::chrono::duration<double>(end - last).count();
        last = end;
    }

    // Looks at `ready` until it holds (true) or `spin_time` has passed (false).
    template <class Ready>
    static bool spin(Ready&& ready) {
        const auto until = std::chrono::steady_clock::now() + spin_time;
        for (unsigned look = 1;; ++look) {
            if (ready()) return true;
            if (look % 16 == 0) {
                if (std::chrono::steady_clock::now() > until) return false;
                std::this_thread::yield();
            } else {
#if defined(__x86_64__) || defined(__i386__)
                _mm_pause();
#elif defined(__aarch64__)
                asm volatile("yield");
#endif
            }
        }
    }

    void stop_and_join() {
        stop_.store(true, std::memory_order_seq_cst);
        {
            std::lock_guard lock(mutex_);
        }
        wake_.notify_all();
        for (auto& t : workers_) t.join();
    }

    void drain(index thread) {
        clock last = start_clock();
        for (index t; (t = next_.fetch_add(1, std::memory_order_relaxed)) < tasks_;) {
            try {
                call_(context_, t, thread);
            } catch (...) {
                std::lock_guard lock(mutex_);
                if (!error_) error_ = std::current_exception();
            }
            record(t, last);
        }
    }

    void work(index thread) {
        std::uint64_t seen = 0;
        const auto called = [&] {
            return stop_.load(std::memory_order_seq_cst) || generation_.load(std::memory_order_seq_cst) != seen;
        };
        for (;;) {
            if (!spin(called)) {
                std::unique_lock lock(mutex_);
                wake_.wait(lock, called);
            }
            if (stop_.load(std::memory_order_seq_cst)) return;
            seen = generation_.load(std::memory_order_acquire);
            drain(thread);
            if (busy_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
                {
                    std::lock_guard lock(mutex_);  // the caller between its last look and its sleep holds it
                }
                done_.notify_one();
            }
        }
    }

    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable wake_, done_;
    std::atomic<std::uint64_t> generation_{0};  // runs started
    std::atomic<bool> stop_{false};
    void (*call_)(void*, index, index) = nullptr;
    void* context_ = nullptr;
    index tasks_ = 0;
    std::atomic<index> next_{0};
    std::atomic<index> busy_{0};  // workers not done with the current run
    std::exception_ptr error_;
    run_trace* trace_ = nullptr;
};

}  // namespace moe::detail
