#pragma once
/// \file
/// The router registry: the built-in routers by name, each with the settings it takes and how it is
/// built from them (`name`, `settings` and `from` in its own header). `any_router` holds any of them,
/// `make_router` builds one from text (moe-run's options, a golden file's metadata), moe-run declares
/// its router options from it and the conformance tests check every router it lists. A new built-in
/// router is its header, its test and one line in `builtin_routers` (and its README row, which a test
/// checks).

#include "moe/error.hpp"
#include "moe/routers/capacity.hpp"
#include "moe/routers/expert_choice.hpp"
#include "moe/routers/null_experts.hpp"
#include "moe/routers/settings.hpp"
#include "moe/routers/sigmoid_topk.hpp"
#include "moe/routers/sinkhorn.hpp"
#include "moe/routers/softmax_topk.hpp"
#include "moe/routers/top_p.hpp"

#include <array>
#include <concepts>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace moe::routers {

/// What a router type provides to be registered: a name, the settings it takes and a factory that
/// reads them (members it is not given keep their defaults).
template <class R>
concept registrable = requires(const setting_values::reader& v) {
    { R::name } -> std::convertible_to<std::string_view>;
    { std::span<const setting>(R::settings) };
    { R::from(v) } -> std::same_as<R>;
};

/// Whether `capacity<R>` is registered with R: built when capacity_factor is given.
template <class R>
constexpr bool takes_capacity = requires { requires R::takes_capacity; };

namespace detail {
template <class... T>
std::variant<T...> variant_of(std::tuple<T...>);  // the type only
}  // namespace detail

/// Routers `R...` by name. Each R may come with capacity (`takes_capacity`): its settings then
/// include capacity's, and it is built as `capacity<R>` when capacity_factor is given.
template <registrable... R>
struct router_registry {
    static constexpr std::array<std::string_view, sizeof...(R)> names{R::name...};

    /// Every router type the registry can build: each R, followed by capacity<R> where R takes it.
    using variant = decltype(detail::variant_of(
        std::tuple_cat(std::declval<std::conditional_t<takes_capacity<R>, std::tuple<R, capacity<R>>, std::tuple<R>>>()...)));

    [[nodiscard]] static bool contains(std::string_view name) { return ((R::name == name) || ...); }

    /// Whether router `name` is built as `capacity<R>` when capacity_factor is given.
    [[nodiscard]] static bool capacity_applies(std::string_view name) {
        if (!contains(name)) unknown(name);
        return ((R::name == name && takes_capacity<R>) || ...);
    }

    /// The settings of router `name` (capacity's after its own where it takes capacity).
    [[nodiscard]] static std::vector<setting> settings_of(std::string_view name) {
        std::vector<setting> out;
        (void)((R::name == name && (out = settings_of<R>(), true)) || ...);
        if (!contains(name)) unknown(name);
        return out;
    }

    /// Router `name` built from `values`: `value_error` naming the router and key for an unknown
    /// router, a value of one of its settings that is not valid, or a required one missing.
    [[nodiscard]] static variant make(std::string_view name, const setting_values& values) {
        variant out;
        (void)((R::name == name && (out = make<R>(values), true)) || ...);
        if (!contains(name)) unknown(name);
        return out;
    }

    /// The known names, "a, b, c".
    [[nodiscard]] static std::string list() {
        std::string s;
        for (std::string_view n : names) s += (s.empty() ? "" : ", ") + std::string(n);
        return s;
    }

private:
    template <class T>
    static std::vector<setting> settings_of() {
        std::vector<setting> out(T::settings.begin(), T::settings.end());
        if constexpr (takes_capacity<T>) out.insert(out.end(), capacity<T>::settings.begin(), capacity<T>::settings.end());
        return out;
    }
    template <class T>
    static variant make(const setting_values& values) {
        const std::vector<setting> settings = settings_of<T>();
        const setting_values::reader v = values.read_as(T::name, settings);
        if constexpr (takes_capacity<T>)
            if (v.has("capacity_factor")) return capacity<T>::from(T::from(v), v);
        return T::from(v);
    }
    [[noreturn]] static void unknown(std::string_view name) {
        throw value_error("unknown router '" + std::string(name) + "' (the routers: " + list() + ")");
    }
};

/// The built-in routers.
using builtin_routers = router_registry<softmax_topk, sigmoid_topk, top_p, null_experts, sinkhorn, expert_choice>;

}  // namespace moe::routers
