#pragma once

/// @file chorus.hpp
/// Umbrella header: include this to use Chorus from C++.

#include <chorus/communicator.hpp>  // IWYU pragma: export
#include <chorus/engine.hpp>        // IWYU pragma: export
#include <chorus/error.hpp>         // IWYU pragma: export
#include <chorus/memory.hpp>        // IWYU pragma: export
#include <chorus/store.hpp>         // IWYU pragma: export
#include <chorus/types.hpp>         // IWYU pragma: export
#include <chorus/version.hpp>       // IWYU pragma: export
