// NaN-propagating max / min for the horizontal (lane by lane) reductions of a row's range.
//
// std::max(m, x) drops a NaN x (it compares x > m, which is false), so a row whose scores are all NaN (a NaN query)
// would keep m = -inf and be taken for a row with no visible key: output 0 instead of NaN. The vector code
// (at::vec::maximum / minimum) already propagates NaN; these keep it through the last step (docs/contract.md,
// non-finite inputs).
#pragma once

namespace sa_cpu {

template <class T>
inline T nan_max(T m, T x) {
  return (x > m || x != x) ? x : m;  // once m is NaN, neither comparison holds and m stays NaN
}

template <class T>
inline T nan_min(T m, T x) {
  return (x < m || x != x) ? x : m;
}

}  // namespace sa_cpu
