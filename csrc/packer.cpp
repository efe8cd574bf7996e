// veofast._C: best-fit-decreasing packing of sequence lengths into micro-batches under a token budget.
//
// pack_bfd(lengths, budget) -> (indices: int64[n], offsets: int64[bins + 1])
//   lengths: any object exporting a 1-D int64 buffer (a NumPy array, strided or not, array.array("q"), a
//   memoryview), read in place: no per-element conversion, no copy. Bin b holds indices[offsets[b]:offsets[b + 1]].
//
// The algorithm and its tie-breaking rules are the ones of veofast/data/packing.py (the pure-Python fallback and
// test oracle), which documents them; both must return identical arrays for the same input. Here:
// - the visiting order is an LSD radix sort of 64-bit keys (budget - length) << 32 | index (2 passes for budgets
//   below 2**16; the index in the low half keeps equal lengths in increasing index order);
// - the placement needs no search in the common case: as the lengths only decrease, the rooms that fit the
//   current length form a stack whose top is the least of them (see place()); the other rooms wait in a bitset
//   that yields its largest first. Each room value keeps a stack of the bins that have exactly that room (last
//   in, first out);
// - the grouping by bin is a counting sort over the index order (increasing index within a bin).
// Scratch memory is per thread and reused across calls: a call allocates nothing but its two result arrays.
// Where the time goes, one call through pack_sequences over n = 200 log-normal lengths, budget 8192 (~3.8 us on a
// 2.5 GHz Xeon): ~30% placement (~6 ns a sequence), ~30% sort (~5 ns a sequence), ~25% the call itself (~1 us:
// the Python wrapper, argument parsing, the two result arrays), the rest the range check and the grouping.

#include <Python.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kMaxBudget = int64_t{1} << 24;  // the room stacks take 4 bytes per room value: 64 MiB at most
constexpr int64_t kMaxLengths = 0x7ffffffeLL;     // indices and bins are int32 inside
constexpr int64_t kReleaseGilFrom = 4096;         // sequences; below, releasing the GIL costs more than it frees

// A set of room values 0..budget that yields its largest first: a two-level bitset (bit v of words: v is in the
// set; bit w of summary: words[w] is not zero).
class MaxRoomSet {
 public:
  void reset(int64_t budget) {
    const size_t num_words = static_cast<size_t>(budget >> 6) + 1;
    const size_t num_summary = ((num_words - 1) >> 6) + 1;
    if (words_.size() < num_words) words_.resize(num_words, 0);
    if (summary_.size() < num_summary) summary_.resize(num_summary, 0);
  }

  void insert(int64_t r) {
    words_[r >> 6] |= uint64_t{1} << (r & 63);
    summary_[r >> 12] |= uint64_t{1} << ((r >> 6) & 63);
  }

  // Removes `largest`, the largest value of the set; returns the new largest, or -1 when the set is now empty.
  // No masking: every other value of the set lies below `largest`, in its word and in the summary.
  int64_t pop(int64_t largest) {
    const size_t w = static_cast<size_t>(largest >> 6);
    const uint64_t bits = words_[w] & ~(uint64_t{1} << (largest & 63));
    words_[w] = bits;
    if (bits) return static_cast<int64_t>((w << 6) + 63 - __builtin_clzll(bits));
    size_t s = w >> 6;  // the last non-empty word before w, found through the summary
    uint64_t sbits = summary_[s] & ~(uint64_t{1} << (w & 63));
    summary_[s] = sbits;
    while (!sbits) {
      if (s == 0) return -1;
      sbits = summary_[--s];
    }
    const size_t word = (s << 6) + 63 - __builtin_clzll(sbits);
    return static_cast<int64_t>((word << 6) + 63 - __builtin_clzll(words_[word]));
  }

  // Clears r's word and its summary word whole: place() empties the set this way, through the rooms of its open
  // bins (every value left is one of them), without a search.
  void clear_around(int64_t r) {
    words_[r >> 6] = 0;
    summary_[r >> 12] = 0;
  }

 private:
  std::vector<uint64_t> words_;
  std::vector<uint64_t> summary_;
};

// Per-thread scratch, grown on demand and reused. Between calls: low empty and head all -1.
struct Scratch {
  MaxRoomSet low;               // the rooms below the current length (see place())
  std::vector<int32_t> head;    // head[r]: the bin on top of room r's stack, or -1        (budget + 1)
  std::vector<int32_t> below;   // below[b]: the bin under b in its room's stack, or -1   (n: bins <= n)
  std::vector<int32_t> room;    // room[b]: remaining room of bin b                       (n)
  std::vector<int32_t> count;   // count[b]: sequences in bin b, then the grouping cursor  (n)
  std::vector<int32_t> bin_of;  // bin_of[i]: the bin of sequence i                       (n)
  std::vector<int32_t> fits;    // the stack of the rooms that fit, under its top         (n: rooms <= bins)
  std::vector<uint64_t> keys;   // radix sort keys and their ping-pong buffer              (2n)
  std::vector<int32_t> hist;    // radix histograms                                        (passes * 2**digit)
};

thread_local Scratch scratch;  // reached once per call: each access to a thread_local costs a call in a .so

template <typename T>
T* grown(std::vector<T>& v, size_t size) {
  if (v.size() < size) v.resize(size);
  return v.data();
}

// A 1-D int64 sequence in a buffer with any stride (in bytes).
struct Lengths {
  const char* data;
  int64_t stride;
  int64_t n;
  int64_t operator[](int64_t i) const {
    int64_t value;
    std::memcpy(&value, data + i * stride, sizeof(value));
    return value;
  }
};

// The index of the first length outside [0, budget], or -1.
int64_t first_out_of_range(const Lengths& lengths, int64_t budget) {
  for (int64_t i = 0; i < lengths.n; ++i) {
    if (static_cast<uint64_t>(lengths[i]) > static_cast<uint64_t>(budget)) return i;  // negative ones wrap
  }
  return -1;
}

// Sorts the keys (budget - length) << 32 | index of all lengths (each in [0, budget]) into decreasing length,
// then increasing index, with Passes passes of `digit` bits. keys and tmp hold n keys each; returns the one
// that holds the result.
template <int Passes>
uint64_t* radix_sort(Scratch& s, const Lengths& lengths, int64_t budget, int digit, uint64_t* keys, uint64_t* tmp) {
  const int64_t n = lengths.n;
  const uint64_t mask = (uint64_t{1} << digit) - 1;
  const size_t buckets = size_t{1} << digit;
  int32_t* hist = grown(s.hist, Passes * buckets);
  std::fill(hist, hist + Passes * buckets, 0);
  for (int64_t i = 0; i < n; ++i) {  // the histograms of all passes in one read
    const uint64_t key = static_cast<uint64_t>(budget - lengths[i]);
    keys[i] = key << 32 | static_cast<uint64_t>(i);
    for (int p = 0; p < Passes; ++p) ++hist[p * buckets + ((key >> (p * digit)) & mask)];
  }
  int32_t sums[Passes] = {};
  for (size_t d = 0; d < buckets; ++d) {  // exclusive prefix sums, the first slot of each digit: all passes at
    for (int p = 0; p < Passes; ++p) {    // once, as independent chains (a fifth of the sort at n = 200 else)
      const int32_t c = hist[p * buckets + d];
      hist[p * buckets + d] = sums[p];
      sums[p] += c;
    }
  }
  for (int p = 0; p < Passes; ++p) {
    int32_t* h = hist + p * buckets;
    const int shift = 32 + p * digit;
    for (int64_t k = 0; k < n; ++k) tmp[h[(keys[k] >> shift) & mask]++] = keys[k];
    std::swap(keys, tmp);
  }
  return keys;
}

uint64_t* sort_keys(Scratch& s, const Lengths& lengths, int64_t budget, uint64_t* keys, uint64_t* tmp) {
  const int bits = 64 - __builtin_clzll(static_cast<uint64_t>(budget));  // budget - length < 2**bits
  const int max_digit = lengths.n >= 8192 ? 11 : 8;  // wider digits only when n pays for their histograms
  const int passes = (bits + max_digit - 1) / max_digit;
  const int digit = (bits + passes - 1) / passes;
  switch (passes) {  // budget <= 2**24: bits <= 25, at most 4 passes
    case 1: return radix_sort<1>(s, lengths, budget, digit, keys, tmp);
    case 2: return radix_sort<2>(s, lengths, budget, digit, keys, tmp);
    case 3: return radix_sort<3>(s, lengths, budget, digit, keys, tmp);
    default: return radix_sort<4>(s, lengths, budget, digit, keys, tmp);
  }
}

// Places the sequences of keys[0:n] (sorted) into bins; returns the number of bins. Fills bin_of and count.
//
// The lengths come in decreasing order, so a room that fits the current length fits every later one. The rooms
// of the open bins (each room value with its stack of bins, head/below) are kept in two parts:
// - the rooms >= the current length, on a stack, the least on top: the best fit is the top, found without a
//   search (a search waits on the bitset words that the placement before it wrote: that made most of the cost).
//   Whatever joins the stack is below all of it, so it goes on top: what a placement leaves of the top
//   (r - length < r), and the low rooms that the length drops to (below the length before), largest first.
//   Under the stack lies the sentinel `fresh`: no open bin fits, open a new one.
// - the rooms below the current length ("low"), in a bitset that yields its largest first; that largest is kept
//   at hand, so most placements only compare it with the length.
int32_t place(Scratch& s, const uint64_t* keys, int64_t n, int64_t budget) {
  s.low.reset(budget);
  if (static_cast<int64_t>(s.head.size()) < budget + 1) s.head.resize(budget + 1, -1);
  int32_t* head = s.head.data();
  int32_t* below = s.below.data();
  int32_t* room = s.room.data();
  int32_t* count = s.count.data();
  int32_t* bin_of = s.bin_of.data();
  int32_t* fits = s.fits.data();
  const int64_t fresh = budget + 1;
  int64_t top = fresh;    // the top of the stack, out of memory
  int64_t depth = 0;      // fits[0:depth]: the stack under top, top last
  int64_t low_max = -1;   // the largest low room, or -1
  int32_t bins = 0;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t len = budget - static_cast<int64_t>(keys[k] >> 32);
    const int64_t i = static_cast<int64_t>(keys[k] & 0xffffffffu);
    while (low_max >= len) {  // low rooms that now fit: onto the stack, largest first
      fits[depth++] = static_cast<int32_t>(top);
      top = low_max;
      low_max = s.low.pop(low_max);
    }
    int64_t r;
    int32_t bin;
    if (top == fresh) {  // no open bin has room: open a new one
      bin = bins++;
      r = budget;
      count[bin] = 0;
    } else {  // the bin with the least sufficient room, the most recent to reach it on a tie
      r = top;
      bin = head[r];
      head[r] = below[bin];
      if (head[r] < 0) top = fits[--depth];
    }
    const int64_t left = r - len;
    if (left < len) {
      s.low.insert(left);
      low_max = std::max(low_max, left);
    } else if (left != top) {  // on top, below all of the stack (left < r <= top); len == 0 may leave it on top
      fits[depth++] = static_cast<int32_t>(top);
      top = left;
    }
    room[bin] = static_cast<int32_t>(left);
    below[bin] = head[left];
    head[left] = bin;
    bin_of[i] = bin;
    ++count[bin];
  }
  for (int32_t b = 0; b < bins; ++b) {  // leave the scratch clean: only the rooms that hold a bin were touched
    head[room[b]] = -1;
    s.low.clear_around(room[b]);
  }
  return bins;
}

// Groups the indices by bin, increasing index within a bin: writes indices[0:n] and offsets[0:bins + 1].
void group(Scratch& s, int64_t n, int32_t bins, int64_t* indices, int64_t* offsets) {
  int32_t* cursor = s.count.data();
  const int32_t* bin_of = s.bin_of.data();
  int32_t sum = 0;
  offsets[0] = 0;
  for (int32_t b = 0; b < bins; ++b) {
    const int32_t c = cursor[b];
    cursor[b] = sum;
    sum += c;
    offsets[b + 1] = sum;
  }
  for (int64_t i = 0; i < n; ++i) indices[cursor[bin_of[i]]++] = i;
}

// NumPy's own int64 descriptor ('l' on Linux), looked up once and kept for good (a borrowed reference).
PyObject* int64_descr() {
  static PyObject* const descr = py::dtype::of<int64_t>().release().ptr();
  return descr;
}

// The lengths argument, read in place: a NumPy int64 vector straight from its fields (the common case: the
// buffer protocol costs more than the rest of a call over a few sequences), anything else through a read-only
// buffer, released on destruction.
class LengthsArg {
 public:
  explicit LengthsArg(py::handle obj) {
    if (is_int64_vector(obj)) {
      const auto* array = py::detail::array_proxy(obj.ptr());
      lengths_ = {array->data, array->strides[0], array->dimensions[0]};
      return;
    }
    if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_STRIDES | PyBUF_FORMAT) != 0) {
      const py::error_already_set error;
      throw py::type_error(std::string("pack_bfd: lengths must export a 1-D int64 buffer: ") + error.what());
    }
    const char* format = view_.format ? view_.format : "B";
    if (*format == '@' || *format == '=') ++format;
    const bool int64 = view_.itemsize == 8 && (std::strcmp(format, "q") == 0 || std::strcmp(format, "l") == 0);
    if (!int64 || view_.ndim != 1) {
      const std::string what = "got format '" + std::string(view_.format ? view_.format : "B") + "', itemsize " +
                               std::to_string(view_.itemsize) + ", " + std::to_string(view_.ndim) + " dims";
      PyBuffer_Release(&view_);
      throw std::invalid_argument("pack_bfd: lengths must be a 1-D int64 buffer, " + what);
    }
    held_ = true;
    lengths_ = {static_cast<const char*>(view_.buf), view_.strides[0], view_.shape[0]};
  }
  ~LengthsArg() {
    if (held_) PyBuffer_Release(&view_);
  }
  LengthsArg(const LengthsArg&) = delete;
  LengthsArg& operator=(const LengthsArg&) = delete;

  const Lengths& lengths() const { return lengths_; }

 private:
  // A 1-D NumPy array of native int64 (EquivTypes: any int64 alias, not byte-swapped).
  static bool is_int64_vector(py::handle obj) {
    const auto& api = py::detail::npy_api::get();
    if (!api.PyArray_Check_(obj.ptr())) return false;
    const auto* array = py::detail::array_proxy(obj.ptr());
    return array->nd == 1 && (array->descr == int64_descr() || api.PyArray_EquivTypes_(array->descr, int64_descr()));
  }

  Lengths lengths_{};
  Py_buffer view_{};
  bool held_ = false;
};

// A new 1-D int64 NumPy array of `size` elements (straight through NumPy's C API: py::array_t's constructor
// costs twice as much, which shows at n = 200).
py::object new_int64_array(int64_t size) {
  auto& api = py::detail::npy_api::get();
  PyObject* descr = int64_descr();
  Py_INCREF(descr);  // stolen below
  Py_intptr_t dims[1] = {static_cast<Py_intptr_t>(size)};
  PyObject* array = api.PyArray_NewFromDescr_(api.PyArray_Type_, descr, 1, dims, nullptr, nullptr, 0, nullptr);
  if (!array) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(array);
}

int64_t* array_data(const py::object& array) {
  return reinterpret_cast<int64_t*>(py::detail::array_proxy(array.ptr())->data);
}

// Runs fn() without the GIL when n is large enough for other threads to gain from it.
template <typename Fn>
void run_released_from(int64_t n, Fn&& fn) {
  if (n < kReleaseGilFrom) return fn();
  py::gil_scoped_release release;
  fn();
}

py::tuple pack_bfd(py::handle lengths_obj, int64_t budget) {
  if (budget < 1 || budget > kMaxBudget) {
    throw std::invalid_argument("pack_bfd: budget must be in [1, 2**24], got " + std::to_string(budget));
  }
  const LengthsArg arg(lengths_obj);
  const Lengths& lengths = arg.lengths();
  const int64_t n = lengths.n;
  if (n > kMaxLengths) throw std::invalid_argument("pack_bfd: at most 2**31 - 2 lengths, got " + std::to_string(n));
  const int64_t bad = first_out_of_range(lengths, budget);
  if (bad >= 0) {
    throw std::invalid_argument("pack_bfd: lengths[" + std::to_string(bad) + "] = " + std::to_string(lengths[bad]) +
                                " is outside [0, budget=" + std::to_string(budget) + "]");
  }
  Scratch& s = scratch;
  int32_t bins = 0;
  run_released_from(n, [&] {
    const size_t size = static_cast<size_t>(n);
    uint64_t* keys = grown(s.keys, 2 * size);
    grown(s.below, size), grown(s.room, size), grown(s.count, size), grown(s.bin_of, size), grown(s.fits, size);
    bins = place(s, sort_keys(s, lengths, budget, keys, keys + size), n, budget);
  });
  py::object indices = new_int64_array(n);
  py::object offsets = new_int64_array(static_cast<int64_t>(bins) + 1);
  int64_t* indices_data = array_data(indices);
  int64_t* offsets_data = array_data(offsets);
  run_released_from(n, [&] { group(s, n, bins, indices_data, offsets_data); });
  return py::make_tuple(std::move(indices), std::move(offsets));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "veofast C++ extension: the dynamic-batching packer.";
  m.attr("MAX_BUDGET") = kMaxBudget;
  m.def("pack_bfd", &pack_bfd, py::arg("lengths"), py::arg("budget"),
        "Best-fit-decreasing packing (see veofast/data/packing.py). lengths: a 1-D int64 buffer (n,), each in "
        "[0, budget], read in place; budget in [1, MAX_BUDGET]. Returns (indices int64 (n,), offsets int64 "
        "(bins + 1,)): bin b holds indices[offsets[b]:offsets[b + 1]].");
}
