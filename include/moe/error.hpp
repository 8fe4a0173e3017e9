#pragma once
/// \file
/// The library's exception types. Every error names what is wrong: a shape, a config key, a tensor
/// name, a file, a value. Catch `moe::error` to catch them all.

#include <stdexcept>
#include <string>

namespace moe {

/// Base of every exception the library throws.
class error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// A tensor or matrix has the wrong shape (rows, columns, rank).
class shape_error : public error {
public:
    using error::error;
};

/// A hyper-parameter or option is out of range (k larger than the number of experts, ...).
class value_error : public error {
public:
    using error::error;
};

/// A configuration (config.json or the options of a family) is missing a key or has a bad one.
class config_error : public error {
public:
    using error::error;
};

/// A file cannot be read or written, or its contents are malformed (safetensors, JSON, index).
class io_error : public error {
public:
    using error::error;
};

}  // namespace moe
