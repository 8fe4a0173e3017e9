#include <moe/detail/thread_pool.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

TEST_CASE("thread_pool runs every task once, whether its workers are watching or asleep", "[thread_pool]") {
    for (const moe::index threads : {1, 2, 3, 7, 16}) {
        moe::detail::thread_pool pool(threads);
        REQUIRE(pool.size() == threads);
        for (int run = 0; run < 200; ++run) {
            const moe::index tasks = run % 37;
            std::vector<std::atomic<int>> done(static_cast<std::size_t>(tasks));
            std::atomic<bool> thread_in_range{true};
            auto f = [&](moe::index t, moe::index thread) {
                done[static_cast<std::size_t>(t)].fetch_add(1);
                if (thread < 0 || thread >= threads) thread_in_range = false;
            };
            pool.run(tasks, f);  // back to back: the workers are still watching for work
            for (const auto& d : done) REQUIRE(d.load() == 1);
            REQUIRE(thread_in_range);
            if (run % 50 == 49)  // past the watch: the workers sleep and are woken
                std::this_thread::sleep_for(moe::detail::thread_pool::spin_time * 3);
        }
    }
}

TEST_CASE("thread_pool rethrows a task's exception after every task has run", "[thread_pool]") {
    for (const moe::index threads : {1, 4}) {
        moe::detail::thread_pool pool(threads);
        std::atomic<int> ran{0};
        auto f = [&](moe::index t, moe::index) {
            ran.fetch_add(1);
            if (t == 5) throw std::runtime_error("task 5");
        };
        CHECK_THROWS_WITH(pool.run(40, f), "task 5");
        CHECK(ran.load() == 40);
        ran = 0;
        auto one = [&](moe::index, moe::index) {
            ran.fetch_add(1);
            throw std::runtime_error("alone");
        };
        CHECK_THROWS_WITH(pool.run(1, one), "alone");
        CHECK(ran.load() == 1);
        // The pool works on afterwards.
        ran = 0;
        auto g = [&](moe::index, moe::index) { ran.fetch_add(1); };
        pool.run(40, g);
        CHECK(ran.load() == 40);
    }
}

TEST_CASE("a traced thread_pool records a time for every task of every run", "[thread_pool]") {
    // A task's time runs from its thread's previous task's end: on one thread they add up to the run,
    // less the pool's own start and end. Tasks of 2 ms keep that below 10% even under an emulator.
    for (const moe::index threads : {1, 3}) {
        moe::detail::thread_pool pool(threads);
        moe::detail::run_trace trace;
        pool.set_trace(&trace);
        auto f = [](moe::index, moe::index) { std::this_thread::sleep_for(std::chrono::milliseconds(2)); };
        const auto start = std::chrono::steady_clock::now();
        pool.run(12, f);
        const double run = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        pool.run(1, f);
        pool.set_trace(nullptr);
        pool.run(2, f);
        REQUIRE(trace.runs() == 2);
        REQUIRE(trace.run(0).size() == 12);
        REQUIRE(trace.run(1).size() == 1);
        double sum = 0;
        for (const double t : trace.run(0)) {
            CHECK(t >= 2e-3);
            sum += t;
        }
        CHECK(trace.run(1)[0] >= 2e-3);
        CHECK(sum <= static_cast<double>(threads) * run);
        if (threads == 1) CHECK(sum >= 0.9 * run);
        // Cleared, the trace keeps its storage: tracing the same runs again allocates nothing.
        const double* storage = trace.times.data();
        trace.clear();
        pool.set_trace(&trace);
        pool.run(12, f);
        pool.set_trace(nullptr);
        CHECK(trace.runs() == 1);
        CHECK(trace.run(0).size() == 12);
        CHECK(trace.times.data() == storage);
    }
}

namespace {
std::atomic<int> started{0};
std::atomic<int> throwing{0};
void count_start() { started.fetch_add(1); }
void throw_on_start() {
    throwing.fetch_add(1);
    throw std::runtime_error("no scratch");
}
}  // namespace

TEST_CASE("each thread a thread_pool starts calls its on_start first; one that throws still works", "[thread_pool]") {
    for (const moe::index threads : {1, 2, 5}) {
        started = 0;
        {
            moe::detail::thread_pool pool(threads, &count_start);
            std::atomic<int> ran{0};
            auto f = [&](moe::index, moe::index) { ran.fetch_add(1); };
            pool.run(64, f);
            CHECK(ran == 64);
        }
        CHECK(started == threads - 1);  // the workers; the calling thread is the caller's to prepare
    }
    throwing = 0;
    {
        moe::detail::thread_pool pool(3, &throw_on_start);
        std::atomic<int> ran{0};
        auto f = [&](moe::index, moe::index) { ran.fetch_add(1); };
        for (int run = 0; run < 20; ++run) pool.run(30, f);
        CHECK(ran == 600);
    }
    CHECK(throwing == 2);  // counted once the workers are joined
}
