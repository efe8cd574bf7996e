// veofast._C: best-fit-decreasing packing of sequence lengths into micro-batches under a token budget.
//
// pack_bfd(lengths: int64[n], budget: int) -> (indices: int64[n], offsets: int64[bins + 1])
//
// The algorithm and its tie-breaking rules are the ones of veofast/data/packing.py (the pure-Python
// fallback and test oracle), which documents them; both must return identical arrays for the same input.
// Here the open bins are indexed by their remaining room: a two-level bitset over room values 0..budget finds
// "the smallest room >= length" with a few count-trailing-zeros, and each room value keeps a stack of the bins
// that have exactly that room (last in, first out). Sorting is a radix sort, O(n log(budget)); each placement is O(budget / 2**18) word scans.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// Which room values 0..budget have at least one open bin, with "next set value >= r" queries.
class RoomIndex {
 public:
  void reset(int64_t budget) {
    const size_t words = static_cast<size_t>(budget >> 6) + 1;
    if (words_.size() < words) {
      words_.assign(words, 0);
      summary_.assign((words >> 6) + 1, 0);
    }
    num_words_ = words;
  }

  void set(int64_t r) {
    words_[r >> 6] |= uint64_t{1} << (r & 63);
    summary_[r >> 12] |= uint64_t{1} << ((r >> 6) & 63);
  }

  void clear(int64_t r) {
    const size_t w = static_cast<size_t>(r >> 6);
    words_[w] &= ~(uint64_t{1} << (r & 63));
    if (words_[w] == 0) summary_[w >> 6] &= ~(uint64_t{1} << (w & 63));
  }

  // The smallest set value >= r, or -1 when there is none.
  int64_t next(int64_t r) const {
    size_t w = static_cast<size_t>(r >> 6);
    if (w >= num_words_) return -1;
    const uint64_t bits = words_[w] & (~uint64_t{0} << (r & 63));
    if (bits) return static_cast<int64_t>((w << 6) + __builtin_ctzll(bits));
    ++w;  // first word after w that is non-empty, found through the summary
    if (w >= num_words_) return -1;
    size_t s = w >> 6;
    uint64_t sbits = summary_[s] & (~uint64_t{0} << (w & 63));
    const size_t num_summary = ((num_words_ - 1) >> 6) + 1;
    while (!sbits) {
      if (++s >= num_summary) return -1;
      sbits = summary_[s];
    }
    const size_t word = (s << 6) + __builtin_ctzll(sbits);
    return static_cast<int64_t>((word << 6) + __builtin_ctzll(words_[word]));
  }

 private:
  std::vector<uint64_t> words_;
  std::vector<uint64_t> summary_;
  size_t num_words_ = 0;
};

// Scratch space reused across calls on one thread, so a call costs O(n log n), not O(budget).
struct Scratch {
  RoomIndex rooms;
  std::vector<int64_t> head;  // head[r]: the bin on top of room r's stack, or -1
  std::vector<int64_t> below;  // below[b]: the bin under b in its room's stack, or -1
  std::vector<int64_t> room;  // room[b]: remaining room of bin b
  std::vector<int64_t> order;  // the visiting order
  std::vector<int64_t> tmp;
  std::vector<int64_t> bin_of;
  std::vector<int64_t> offsets;  // the result's bin offsets
  std::vector<int64_t> cursor;
};

thread_local Scratch scratch;

// Packs lengths[0:n]; writes the grouped indices to indices[0:n] and the bin offsets to s.offsets.
void pack(const int64_t* lengths, int64_t n, int64_t budget, int64_t* indices) {
  Scratch& s = scratch;
  s.rooms.reset(budget);
  if (static_cast<int64_t>(s.head.size()) < budget + 1) s.head.assign(budget + 1, -1);
  s.below.clear();
  s.room.clear();
  s.bin_of.resize(n);

  // Decreasing length, then increasing index: a stable LSD radix sort of (budget - length), 8 bits a pass,
  // starting from index order.
  s.order.resize(n);
  s.tmp.resize(n);
  for (int64_t i = 0; i < n; ++i) s.order[i] = i;
  for (int shift = 0; (budget >> shift) > 0; shift += 8) {
    int64_t count[257] = {0};
    for (int64_t i = 0; i < n; ++i) ++count[((budget - lengths[i]) >> shift & 0xff) + 1];
    for (int d = 0; d < 256; ++d) count[d + 1] += count[d];
    for (int64_t k = 0; k < n; ++k) {
      const int64_t i = s.order[k];
      s.tmp[count[(budget - lengths[i]) >> shift & 0xff]++] = i;
    }
    std::swap(s.order, s.tmp);
  }

  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = s.order[k];
    const int64_t len = lengths[i];
    const int64_t r = s.rooms.next(len);
    int64_t bin;
    if (r < 0) {  // no open bin has room: open a new one
      bin = static_cast<int64_t>(s.room.size());
      s.room.push_back(budget);
      s.below.push_back(-1);
    } else {  // the bin with the least sufficient room, the most recent to reach it on a tie
      bin = s.head[r];
      s.head[r] = s.below[bin];
      if (s.head[r] < 0) s.rooms.clear(r);
    }
    const int64_t left = s.room[bin] - len;
    s.room[bin] = left;
    s.below[bin] = s.head[left];
    s.head[left] = bin;
    s.rooms.set(left);
    s.bin_of[i] = bin;
  }

  // Leave the scratch clean for the next call: only the rooms that hold a bin were touched.
  for (const int64_t left : s.room) {
    s.head[left] = -1;
    s.rooms.clear(left);
  }

  // Group the indices by bin, increasing index within a bin (a counting sort).
  const size_t bins = s.room.size();
  s.offsets.assign(bins + 1, 0);
  for (int64_t i = 0; i < n; ++i) ++s.offsets[s.bin_of[i] + 1];
  for (size_t b = 0; b < bins; ++b) s.offsets[b + 1] += s.offsets[b];
  s.cursor.assign(s.offsets.begin(), s.offsets.end() - 1);
  for (int64_t i = 0; i < n; ++i) indices[s.cursor[s.bin_of[i]]++] = i;
}

py::tuple pack_bfd(py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths, int64_t budget) {
  if (lengths.ndim() != 1) {
    throw std::invalid_argument("pack_bfd: lengths must be 1-D, got " + std::to_string(lengths.ndim()) + " dims");
  }
  if (budget < 1 || budget > 0x7fffffffLL) {
    throw std::invalid_argument("pack_bfd: budget must be in [1, 2**31 - 1], got " + std::to_string(budget));
  }
  const int64_t n = lengths.shape(0);
  if (n > 0x7fffffffLL) throw std::invalid_argument("pack_bfd: more than 2**31 - 1 lengths");
  const int64_t* data = lengths.data();
  for (int64_t i = 0; i < n; ++i) {
    if (data[i] < 0 || data[i] > budget) {
      throw std::invalid_argument("pack_bfd: lengths[" + std::to_string(i) + "] = " + std::to_string(data[i]) +
                                  " is outside [0, budget=" + std::to_string(budget) + "]");
    }
  }
  py::array_t<int64_t> indices(static_cast<py::ssize_t>(n));
  int64_t* out = indices.mutable_data();
  {
    py::gil_scoped_release release;
    pack(data, n, budget, out);
  }
  const std::vector<int64_t>& offsets = scratch.offsets;
  py::array_t<int64_t> out_offsets(static_cast<py::ssize_t>(offsets.size()));
  std::copy(offsets.begin(), offsets.end(), out_offsets.mutable_data());
  return py::make_tuple(indices, out_offsets);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "veofast C++ extension: the dynamic-batching packer.";
  m.def("pack_bfd", &pack_bfd, py::arg("lengths"), py::arg("budget"),
        "Best-fit-decreasing packing (see veofast/data/packing.py). lengths: int64 (n,), each in [0, budget]. "
        "Returns (indices int64 (n,), offsets int64 (bins + 1,)): bin b holds indices[offsets[b]:offsets[b + 1]].");
}
