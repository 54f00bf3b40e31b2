// TEMPORARY (development only): weak placeholders for algorithms being written.
#include "algorithms/algorithms.hpp"
namespace chorus::algo {
namespace {
std::string pending(const Layout&, const Call&) { return "not implemented yet"; }
double zero(const Layout&, const Model&, const Call&) { return 0; }
void nothing(Context&, const Args&) {}
}  // namespace
[[gnu::weak]] extern const Algorithm kRecursiveDoublingAllreduce = {"recursive_doubling", Coll::Allreduce, "", pending, zero, nothing};
[[gnu::weak]] extern const Algorithm kRabenseifnerAllreduce = {"rabenseifner", Coll::Allreduce, "", pending, zero, nothing};
[[gnu::weak]] extern const Algorithm kTreeAllreduce = {"tree", Coll::Allreduce, "", pending, zero, nothing};
[[gnu::weak]] extern const Algorithm kBinomialBroadcast = {"binomial", Coll::Broadcast, "", pending, zero, nothing};
[[gnu::weak]] extern const Algorithm kScatterAllgatherBroadcast = {"scatter_allgather", Coll::Broadcast, "", pending, zero, nothing};
[[gnu::weak]] extern const Algorithm kBruckAllgather = {"bruck", Coll::Allgather, "", pending, zero, nothing};
[[gnu::weak]] extern const Algorithm kHalvingReduceScatter = {"recursive_halving", Coll::ReduceScatter, "", pending, zero, nothing};
}  // namespace chorus::algo
