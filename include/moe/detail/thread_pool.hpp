#pragma once
// Internal: a small persistent thread pool. Tasks are pulled from an atomic counter; which thread runs
// a task never changes what it computes, so results do not depend on the thread count.

#include "moe/types.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace moe::detail {

class thread_pool {
public:
    /// `threads` workers in all, the calling thread included.
    explicit thread_pool(index threads) {
        try {
            for (index w = 1; w < threads; ++w) workers_.emplace_back([this, w] { work(w); });
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
    /// [0, size()) and identifies per-thread scratch. The first exception a task throws is rethrown here.
    template <class F>
    void run(index tasks, F& f) {
        if (trace_ != nullptr) trace_->emplace_back(static_cast<std::size_t>(tasks), 0.0);
        if (workers_.empty() || tasks <= 1) {
            for (index t = 0; t < tasks; ++t) timed(t, [&] { f(t, 0); });
            return;
        }
        {
            std::lock_guard lock(mutex_);
            call_ = [](void* ctx, index task, index thread) { (*static_cast<F*>(ctx))(task, thread); };
            context_ = &f;
            tasks_ = tasks;
            next_.store(0, std::memory_order_relaxed);
            busy_ = static_cast<index>(workers_.size());
            error_ = nullptr;
            ++generation_;
        }
        wake_.notify_all();
        drain(0);
        std::unique_lock lock(mutex_);
        done_.wait(lock, [this] { return busy_ == 0; });
        if (error_) std::rethrow_exception(error_);
    }

    /// Benchmarks: while `trace` is set, every `run` appends the seconds each of its tasks took, by task
    /// index (to list-schedule a task list for more threads than run it).
    void set_trace(std::vector<std::vector<double>>* trace) { trace_ = trace; }

private:
    template <class Call>
    void timed(index task, Call&& call) {
        if (trace_ == nullptr) return call();
        const auto start = std::chrono::steady_clock::now();
        call();
        trace_->back()[static_cast<std::size_t>(task)] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }

    void stop_and_join() {
        {
            std::lock_guard lock(mutex_);
            stop_ = true;
        }
        wake_.notify_all();
        for (auto& t : workers_) t.join();
    }

    void drain(index thread) {
        for (index t; (t = next_.fetch_add(1, std::memory_order_relaxed)) < tasks_;) {
            try {
                timed(t, [&] { call_(context_, t, thread); });
            } catch (...) {
                std::lock_guard lock(mutex_);
                if (!error_) error_ = std::current_exception();
            }
        }
    }

    void work(index thread) {
        std::uint64_t seen = 0;
        for (;;) {
            {
                std::unique_lock lock(mutex_);
                wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
                if (stop_) return;
                seen = generation_;
            }
            drain(thread);
            std::lock_guard lock(mutex_);
            if (--busy_ == 0) done_.notify_one();
        }
    }

    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable wake_, done_;
    std::uint64_t generation_ = 0;
    bool stop_ = false;
    void (*call_)(void*, index, index) = nullptr;
    void* context_ = nullptr;
    index tasks_ = 0;
    std::atomic<index> next_{0};
    index busy_ = 0;
    std::exception_ptr error_;
    std::vector<std::vector<double>>* trace_ = nullptr;
};

}  // namespace moe::detail
