// moe/losses/loss_term.hpp: the contract of a loss term, and the scratch buffer losses reuse.
#include <catch2/catch.hpp>

#include <moe/losses/losses.hpp>

namespace {
// A loss of one's own: the sum of the logits (gradient 1 everywhere).
struct logit_sum {
    static constexpr std::string_view name = "logit_sum";
    template <class Scalar>
    Scalar value(const moe::routing<Scalar>&, const moe::matrix<Scalar>& z) const { return z.sum(); }
    template <class Scalar>
    void gradient(const moe::routing<Scalar>&, const moe::matrix<Scalar>&, moe::matrix<Scalar>& g) const {
        g.array() += Scalar(1);
    }
};
struct no_gradient {
    static constexpr std::string_view name = "no_gradient";
    template <class Scalar>
    Scalar value(const moe::routing<Scalar>&, const moe::matrix<Scalar>&) const { return 0; }
};
}  // namespace

TEST_CASE("loss_term accepts the library's losses and one's own, and rejects a loss without a gradient", "[losses]") {
    namespace l = moe::losses;
    STATIC_REQUIRE(moe::loss_term<l::load_balance, float> && moe::loss_term<l::load_balance, double>);
    STATIC_REQUIRE(moe::loss_term<l::z_loss, float> && moe::loss_term<l::null_balance, float>);
    STATIC_REQUIRE(moe::loss_term<l::seq_balance, double>);
    STATIC_REQUIRE(moe::loss_term<logit_sum, float> && moe::loss_term<logit_sum, double>);
    STATIC_REQUIRE_FALSE(moe::loss_term<no_gradient, float>);
    STATIC_REQUIRE_FALSE(moe::loss_term<l::bias_update, float>);  // a step on the bias, not a loss term
}

TEST_CASE("a loss's scratch buffer is not part of its value: a copy starts empty", "[losses]") {
    moe::losses::detail::scratch<double> a;
    a.values = {1, 2, 3};
    const moe::losses::detail::scratch<double> b = a;
    CHECK(b.values.empty());
    moe::losses::detail::scratch<double> c;
    c.values = {4};
    c = a;
    CHECK(c.values == std::vector<double>{4});
}
