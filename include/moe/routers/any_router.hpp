#pragma once
/// \file
/// `any_router`: one of the built-in routers, chosen at run time (from a command line or a config)
/// while the layer type stays the same; `make_router` builds one from its name and settings as text.

#include "moe/concepts.hpp"
#include "moe/routers/registry.hpp"
#include "moe/statistics.hpp"

#include <span>
#include <utility>
#include <variant>

namespace moe::routers {

/// Holds any built-in router (`builtin_routers`, capacity included) and forwards to it. `batch_dependent` is conservatively true for the
/// type; `is_batch_dependent()` tells the held router's property.
class any_router {
public:
    using variant = builtin_routers::variant;

    any_router() = default;
    template <class R>
        requires std::is_constructible_v<variant, R>
    any_router(R r) : router_(std::move(r)) {}  // NOLINT(google-explicit-constructor): any router converts

    static constexpr bool batch_dependent = true;

    [[nodiscard]] bool is_batch_dependent() const {
        return std::visit([](const auto& r) { return std::remove_cvref_t<decltype(r)>::batch_dependent; }, router_);
    }
    [[nodiscard]] const variant& get() const { return router_; }

    [[nodiscard]] index logit_rows(index experts) const {
        return std::visit([&](const auto& r) { return moe::logit_rows(r, experts); }, router_);
    }
    void validate(index experts) const {
        std::visit([&](const auto& r) { r.validate(experts); }, router_);
    }

    /// The state of the held router (index i of `variant` at index i of `states`).
    template <class Scalar>
    class state {
    public:
        state(const any_router& r, index experts) { emplace<0>(r.router_.index(), experts); }

        vector<Scalar>* correction_bias() {
            return std::visit([](auto& s) { return moe::correction_bias<Scalar>(s); }, states_);
        }
        void add_statistics(routing_statistics& out) const {
            std::visit([&](const auto& s) {
                if constexpr (requires { s.add_statistics(out); }) s.add_statistics(out);
            }, states_);
        }

    private:
        friend any_router;
        template <std::size_t... I>
        static auto states_of(std::index_sequence<I...>)
            -> std::variant<router_state_t<std::variant_alternative_t<I, variant>, Scalar>...>;
        decltype(states_of(std::make_index_sequence<std::variant_size_v<variant>>())) states_{std::in_place_index<0>, 1};

        template <std::size_t I>
        void emplace(std::size_t which, index experts) {
            if constexpr (I < std::variant_size_v<variant>) {
                if (which == I)
                    states_.template emplace<I>(experts);
                else
                    emplace<I + 1>(which, experts);
            }
        }
    };

    // Defined below the class, not inline: a program may build them once (MOE_ANY_ROUTER_INSTANCES).
    template <class Scalar>
    void route(const matrix<Scalar>& logits, state<Scalar>& st, routing<Scalar>& out) const;
    template <class Scalar>
    void backward(const matrix<Scalar>& logits, const routing<Scalar>& r, state<Scalar>& st,
                  std::span<const Scalar> grad_weights, matrix<Scalar>& grad_logits) const;

private:
    template <std::size_t I, class Scalar>
    void route_at(const matrix<Scalar>& logits, state<Scalar>& st, routing<Scalar>& out) const {
        if constexpr (I < std::variant_size_v<variant>) {
            if (router_.index() != I) return route_at<I + 1>(logits, st, out);
            if (st.states_.index() != I) st.template emplace<0>(I, logits.cols());
            moe::route(std::get<I>(router_), logits, std::get<I>(st.states_), out);
        }
    }

    template <std::size_t I, class Scalar>
    void backward_at(const matrix<Scalar>& logits, const routing<Scalar>& r, state<Scalar>& st,
                     std::span<const Scalar> grad_weights, matrix<Scalar>& grad_logits) const {
        if constexpr (I < std::variant_size_v<variant>) {
            if (router_.index() != I) return backward_at<I + 1>(logits, r, st, grad_weights, grad_logits);
            moe::route_backward(std::get<I>(router_), logits, r, std::get<I>(st.states_), grad_weights, grad_logits);
        }
    }

    variant router_ = softmax_topk{};
};

template <class Scalar>
void any_router::route(const matrix<Scalar>& logits, state<Scalar>& st, routing<Scalar>& out) const {
    route_at<0>(logits, st, out);
}

template <class Scalar>
void any_router::backward(const matrix<Scalar>& logits, const routing<Scalar>& r, state<Scalar>& st,
                          std::span<const Scalar> grad_weights, matrix<Scalar>& grad_logits) const {
    backward_at<0>(logits, r, st, grad_weights, grad_logits);
}

static_assert(differentiable_router<any_router, float> && differentiable_router<any_router, double>);

/// The built-in router `name` with `values` (routers/registry.hpp: a setting not given keeps the
/// router's default; other keys are ignored). Throws `value_error` naming the router and the setting.
inline any_router make_router(std::string_view name, const setting_values& values) {
    return builtin_routers::make(name, values);
}

/// The instantiations of this header that a program may build once (`moe/compiled.hpp`): `EXTERN` is
/// `extern` to declare them, empty to define them.
#define MOE_ANY_ROUTER_INSTANCES(EXTERN) \
    EXTERN template void any_router::route(const matrix<float>&, state<float>&, routing<float>&) const; \
    EXTERN template void any_router::route(const matrix<double>&, state<double>&, routing<double>&) const; \
    EXTERN template void any_router::backward(const matrix<float>&, const routing<float>&, state<float>&, \
                                              std::span<const float>, matrix<float>&) const; \
    EXTERN template void any_router::backward(const matrix<double>&, const routing<double>&, state<double>&, \
                                              std::span<const double>, matrix<double>&) const;
#if defined(MOE_EXTERN_TEMPLATES)
MOE_ANY_ROUTER_INSTANCES(extern)
#endif

}  // namespace moe::routers
