#pragma once

/// @file export.hpp
/// Symbol visibility. libchorus is built with hidden visibility; only symbols
/// marked CHORUS_API are exported from the shared library.

#if defined(CHORUS_BUILDING_LIBRARY)
/// Marks a class or function as part of the exported ABI of libchorus.
#define CHORUS_API __attribute__((visibility("default")))
#else
/// Marks a class or function as part of the exported ABI of libchorus.
#define CHORUS_API
#endif
