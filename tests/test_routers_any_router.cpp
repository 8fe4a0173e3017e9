#include "golden.hpp"

#include <moe/routers/any_router.hpp>
#include <moe/testing/conformance.hpp>

using moe::routers::any_router;

TEST_CASE("any_router runs the held router exactly like the router itself", "[routers][any_router]") {
    for (const char* name : {"sigmoid_groups", "capacity_probs", "null_experts", "sinkhorn_plan", "expert_choice", "top_p_09"}) {
        const golden::layer_case c(name);
        const any_router router = c.router();
        moe::layer<float, any_router, moe::experts::swiglu> layer(c.shape(), router);
        c.load(layer);
        c.check(layer);
    }
}

TEST_CASE("any_router forwards properties and validation", "[routers][any_router]") {
    CHECK_FALSE(any_router(moe::routers::top_p{}).is_batch_dependent());
    CHECK(any_router(moe::routers::expert_choice{}).is_batch_dependent());
    CHECK(any_router(moe::routers::null_experts{.nulls = 3}).logit_rows(5) == 8);
    CHECK_THROWS_WITH(any_router(moe::routers::softmax_topk{.k = 7}).validate(4), Catch::Contains("k = 7"));
    any_router::state<float> st(any_router(moe::routers::sigmoid_topk{.k = 1}), 4);
    REQUIRE(st.correction_bias() != nullptr);
    CHECK(st.correction_bias()->size() == 4);
    any_router::state<float> none(any_router(moe::routers::softmax_topk{}), 4);
    CHECK(none.correction_bias() == nullptr);
}
