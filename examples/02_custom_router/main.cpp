// A router of your own in about 30 lines: "confident top-k". Each token takes its best expert and
// then up to k-1 more whose probability is at least `ratio` times the best one's, so confident tokens
// use fewer experts. It is checked with moe::testing (its invariants and its backward against finite
// differences), then run in a layer next to plain top-2.
#include <moe/moe.hpp>
#include <moe/testing/conformance.hpp>
#include <moe/testing/gradient_check.hpp>

#include <cstdio>

struct confident_topk {
    moe::index k = 2;
    double ratio = 0.5;
    static constexpr bool batch_dependent = false;  // a token's choice never looks at other tokens

    void validate(moe::index experts) const {
        if (k < 1 || k > experts) throw moe::value_error("confident_topk: k = " + std::to_string(k) + " out of range");
        if (!(ratio > 0 && ratio <= 1)) throw moe::value_error("confident_topk: ratio must be in (0, 1]");
    }

    template <class Scalar>
    void route(const moe::matrix<Scalar>& logits, moe::routing<Scalar>& out) const {
        const moe::index tokens = logits.rows(), experts = logits.cols();
        out.begin_tokens(experts);
        out.scores.resize(tokens, experts);
        std::vector<std::int32_t> best(static_cast<std::size_t>(k));
        for (moe::index t = 0; t < tokens; ++t) {
            Scalar* p = out.scores.row(t).data();
            moe::kernels::softmax(logits.row(t).data(), p, experts);
            moe::kernels::top_k(p, experts, k, best.data());  // descending, ties to the lower index
            Scalar sum = 0;
            moe::index n = 0;
            while (n < k && p[best[n]] >= static_cast<Scalar>(ratio) * p[best[0]]) sum += p[best[n++]];
            for (moe::index j = 0; j < n; ++j) out.add_slot(best[j], p[best[j]] / sum);
            out.end_token();
        }
    }

    // For training: the weights are the chosen p divided by their sum, so the library's helper for
    // normalised softmax gates is the whole backward.
    template <class Scalar>
    void backward(const moe::matrix<Scalar>&, const moe::routing<Scalar>& r, std::span<const Scalar> grad_weights,
                  moe::matrix<Scalar>& grad_logits) const {
        moe::routers::logits_backward(r, grad_weights, true, Scalar(0), Scalar(1), grad_logits);
    }
};

int main() {
    const moe::index d = 256, ff = 512, experts = 8, tokens = 512;
    const confident_topk router{.k = 2, .ratio = 0.6};

    // 1. Conformance: ids in range and distinct, finite weights summing to 1, deterministic, and
    //    (since it says so) independent of the rest of the batch.
    const moe::matrix<float> logits = moe::matrix<float>::Random(64, experts) * 3.0f;
    const auto report = moe::testing::check_router(router, logits, experts, {.weight_sum = 1.0});
    std::printf("conformance: %s\n", report.ok() ? "ok" : report.str().c_str());
    if (!report.ok()) return 1;
    const auto gradient = moe::testing::router_gradient_check(router, logits.cast<double>(), experts);
    std::printf("backward against finite differences: %s\n", gradient.ok() ? "ok" : gradient.str().c_str());
    if (!gradient.ok()) return 1;

    // 2. The router in a layer, next to plain top-2 on the same weights.
    moe::layer<float, confident_topk, moe::experts::swiglu> mine({d, ff, experts}, router);
    moe::mixtral_layer<float> top2({d, ff, experts}, {.k = 2, .normalize = true});
    mine.randomize(3);
    top2.randomize(3);
    const moe::matrix<float> x = moe::matrix<float>::Random(tokens, d) * 4.0f;
    moe::matrix<float> y(tokens, d);
    mine.forward(x, y);
    const auto s = mine.statistics();
    std::printf("confident_topk: %ld of %ld tokens use 1 expert, %ld use 2; imbalance %.2f\n",
                static_cast<long>(s.experts_per_token[1]), static_cast<long>(tokens),
                static_cast<long>(s.experts_per_token.size() > 2 ? s.experts_per_token[2] : 0), s.imbalance);
    top2.forward(x, y);
    std::printf("top-2:          %ld expert rows; confident_topk ran %ld (%.0f%%)\n",
                static_cast<long>(top2.statistics().assignments), static_cast<long>(s.assignments),
                100.0 * static_cast<double>(s.assignments) / static_cast<double>(top2.statistics().assignments));
    const auto threads = moe::testing::check_thread_invariance(mine, x);
    std::printf("same output at 1 and 2 threads: %s\n", threads.ok() ? "yes" : threads.str().c_str());
    return threads.ok() ? 0 : 1;
}
