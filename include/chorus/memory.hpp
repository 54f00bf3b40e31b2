#pragma once

/// @file memory.hpp
/// Host memory that the ranks of a host can read from one another directly.

#include <chorus/export.hpp>

#include <cstddef>

namespace chorus {

/// Allocates `bytes` of host memory (page-aligned, zero-filled, its pages
/// reserved up front) in a shared mapping that the shared-memory transport
/// can hand to the other ranks of the host (nccl's ncclMemAlloc, MPI's
/// MPI_Alloc_mem). A collective whose send or receive buffer lies in such
/// memory moves its large messages with one copy: the receiving rank maps
/// the region once (cached from then on) and reduces or copies straight
/// from the sender's buffer instead of through the transport's copy ring.
/// Buffers elsewhere work as before. Usable like any memory, by any
/// communicator, and before a communicator exists; not inherited by a
/// child process (MADV_DONTFORK: a fork()ed child must not touch it). Throws
/// Error(InvalidArgument) for 0 bytes and Error(System) when the memory
/// cannot be had.
CHORUS_API void* mem_alloc(std::size_t bytes);

/// Releases memory from mem_alloc(); nullptr is a no-op. Throws
/// Error(InvalidArgument) for a pointer mem_alloc() did not return (or
/// already released). No collective may still be using it.
CHORUS_API void mem_free(void* ptr);

}  // namespace chorus
