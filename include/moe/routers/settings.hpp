#pragma once
/// \file
/// A router's settings as text: what a built-in router declares it takes (`setting`), and the values a
/// command line or a file's metadata give (`setting_values`), read typed and checked. The router
/// registry (routers/registry.hpp) builds routers from them.

#include "moe/error.hpp"
#include "moe/types.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

namespace moe::routers {

/// Reads all of `text` as a decimal integer, or as a finite number (decimal or scientific, whatever the
/// locale; no hex, no leading '+' or blank); false when it is not one or does not fit.
template <class T>
[[nodiscard]] bool parse(std::string_view text, T& value) {
    T v{};
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (ec != std::errc{} || end != text.data() + text.size() || text.empty()) return false;
    if constexpr (std::is_floating_point_v<T>)
        if (!std::isfinite(v)) return false;
    value = v;
    return true;
}

/// How a setting's text is read.
enum class setting_type {
    integer,  ///< decimal, whole
    number,   ///< a finite floating-point number
    boolean,  ///< `true` or `false`
    choice,   ///< one of `choices`
};

/// One setting a router takes: its key, how moe-run names it, what it means, its type and range (its
/// default is the router's member initialiser). The registry's entries declare these; moe-run's
/// options, their help and the checks of `setting_values` come from them.
struct setting {
    std::string_view key{};       ///< the key in `setting_values` (and in the golden files' metadata)
    std::string_view flag{};      ///< moe-run's option without "--"; empty: not an option (`model_setting`s
                                  ///< come from the model's config)
    std::string_view help{};
    setting_type type = setting_type::number;
    double min = -std::numeric_limits<double>::infinity();  ///< integer and number: the range
    double max = std::numeric_limits<double>::infinity();
    bool open_min = false;                                   ///< the range excludes `min`
    std::string_view choices{};   ///< choice: the values, separated by '|'
    std::string_view example{};   ///< a valid value (the conformance tests build every router from these)
    std::string_view needs{};     ///< another key that must be given with this one
    bool required = false;        ///< the router has no default for it

    /// The range or the choices, as moe-run's help and the errors write them.
    [[nodiscard]] std::string domain() const {
        switch (type) {
            case setting_type::boolean: return "true|false";
            case setting_type::choice: return std::string(choices);
            default: break;
        }
        const auto end = [](double v) {
            if (std::isinf(v)) return std::string(v < 0 ? "-inf" : "inf");
            char text[32];
            return std::string(text, std::to_chars(text, text + sizeof text, v).ptr);  // shortest exact text
        };
        return std::string(open_min ? "(" : "[") + end(min) + ", " + end(max) + (std::isinf(max) ? ")" : "]");
    }

    /// What is wrong with `text` as this setting's value; empty when it is valid.
    [[nodiscard]] std::string problem(std::string_view text) const {
        const std::string got = "'" + std::string(text) + "'";
        switch (type) {
            case setting_type::boolean:
                return text == "true" || text == "false" ? "" : "expects true or false, got " + got;
            case setting_type::choice:
                for (std::size_t at = 0; at <= choices.size();) {
                    const std::size_t bar = std::min(choices.find('|', at), choices.size());
                    if (choices.substr(at, bar - at) == text) return "";
                    at = bar + 1;
                }
                return "expects one of " + std::string(choices) + ", got " + got;
            case setting_type::integer:
            case setting_type::number: break;
        }
        double v = 0;
        if (type == setting_type::integer) {
            index i = 0;
            if (!parse(text, i)) return "expects a decimal integer (in " + domain() + "), got " + got;
            v = static_cast<double>(i);
        } else if (!parse(text, v)) {
            return "expects a finite number (in " + domain() + "), got " + got;
        }
        if (v < min || v > max || (open_min && v == min)) return std::string(text) + " must be in " + domain();
        return "";
    }
};

/// Values of settings by key, as text (a command line, a file's metadata). An empty value counts as
/// not given.
class setting_values {
public:
    setting_values() = default;
    explicit setting_values(std::map<std::string, std::string, std::less<>> values) : values_(std::move(values)) {}

    setting_values& set(const std::string& key, std::string value) {
        values_[key] = std::move(value);
        return *this;
    }
    [[nodiscard]] bool has(std::string_view key) const {
        const auto it = values_.find(key);
        return it != values_.end() && !it->second.empty();
    }
    /// The value of `key`; empty when not given.
    [[nodiscard]] std::string_view text(std::string_view key) const {
        const auto it = values_.find(key);
        return it == values_.end() ? std::string_view() : std::string_view(it->second);
    }

    class reader;
    /// The values as router `router`, which takes `settings`, reads them: every given value of those
    /// settings is checked, and the required ones and those a given one needs must be there
    /// (`value_error` naming the router, the key and the problem). Other keys are ignored.
    [[nodiscard]] reader read_as(std::string_view router, std::span<const setting> settings) const;

private:
    std::map<std::string, std::string, std::less<>> values_;
};

/// Checked values, read into a router's members: a member keeps its default when its key is not given.
/// It refers to the values and the settings it was made from: use it while they live (as a router's
/// `from` does).
class setting_values::reader {
public:
    reader(const setting_values& v, std::string_view router, std::span<const setting> settings)
        : values_(v), router_(router), settings_(settings) {
        for (const setting& s : settings) {
            if (!v.has(s.key)) {
                if (s.required) fail(s.key, "is needed");
                continue;
            }
            if (const std::string p = s.problem(v.text(s.key)); !p.empty()) fail(s.key, p);
            if (!s.needs.empty() && !v.has(s.needs)) fail(s.key, "needs '" + std::string(s.needs) + "'");
        }
    }

    [[nodiscard]] bool has(std::string_view key) const { return values_.has(declared(key).key); }
    [[nodiscard]] std::string_view text(std::string_view key) const { return values_.text(declared(key).key); }
    void read(std::string_view key, index& member) const {
        if (has(key)) (void)parse(text(key), member);  // checked by the constructor
    }
    void read(std::string_view key, double& member) const {
        if (has(key)) (void)parse(text(key), member);
    }
    void read(std::string_view key, bool& member) const {
        if (has(key)) member = text(key) == "true";
    }

private:
    [[nodiscard]] const setting& declared(std::string_view key) const {
        for (const setting& s : settings_)
            if (s.key == key) return s;
        throw error("router " + std::string(router_) + " reads setting '" + std::string(key) + "' but does not declare it");
    }
    [[noreturn]] void fail(std::string_view key, const std::string& what) const {
        throw value_error(std::string(router_) + ": setting '" + std::string(key) + "' " + what);
    }

    const setting_values& values_;
    std::string_view router_;
    std::span<const setting> settings_;
};

inline setting_values::reader setting_values::read_as(std::string_view router, std::span<const setting> settings) const {
    return {*this, router, settings};
}

/// The settings a model's config gives every router that takes them (moe-run fills them from the
/// checkpoint): experts per token, normalisation and scaling of the weights, expert groups.
namespace model_setting {
inline constexpr setting k{.key = "k", .help = "experts per token", .type = setting_type::integer, .min = 1,
                           .example = "2"};
inline constexpr setting normalize{.key = "normalize", .help = "divide the weights by their sum",
                                   .type = setting_type::boolean, .example = "true"};
inline constexpr setting scale{.key = "scale", .help = "multiply the weights by this factor", .min = 0,
                               .open_min = true, .example = "2"};
inline constexpr setting n_group{.key = "n_group", .help = "expert groups", .type = setting_type::integer, .min = 1,
                                 .example = "4"};
inline constexpr setting topk_group{.key = "topk_group", .help = "groups each token may use",
                                    .type = setting_type::integer, .min = 1, .example = "2"};
}  // namespace model_setting

}  // namespace moe::routers
