// veofast._C: best-fit-decreasing packing of sequence lengths into micro-batches under a token budget.
//
// pack_bfd(lengths, budget, /) -> (indices: int64[n], offsets: int64[bins + 1])
//   lengths: any object exporting a 1-D int64 buffer (a NumPy array, strided or not, array.array("q"), a
//   memoryview), read in place: no per-element conversion, no copy. budget: an int. Bin b holds
//   indices[offsets[b]:offsets[b + 1]]. Any other argument type is a TypeError, which pack_sequences answers by
//   converting the arguments (or refusing them) in Python.
//
// The algorithm and its tie-breaking rules are the ones of veofast/data/packing.py (the pure-Python fallback and
// test oracle), which documents them; both must return identical arrays for the same input. Here:
// - the visiting order is an LSD radix sort of 64-bit keys (budget - length) << 32 | index, in even digits of at
//   most 8 bits (2 passes below budget 2**16; the index in the low half keeps equal lengths in increasing index
//   order), which also checks the range of the lengths;
// - the placement needs no search in the common case: as the lengths only decrease, the bins that fit the current
//   length form a stack whose top is the best fit (see place()); the other bins wait, by room, in a bitset that
//   yields its largest room first and a stack of bins per room value (last in, first out);
// - the grouping by bin is a counting sort over the index order (increasing index within a bin).
// Scratch memory is per thread and reused across calls: a call allocates nothing but its two result arrays.
// Where the time goes, one call through pack_sequences over n = 200 log-normal lengths, budget 8192 (~2.5 us on a
// 2.5 GHz Xeon): ~30% sort (~4 ns a sequence), ~28% placement (~3.5 ns a sequence, mostly mispredicted branches:
// whether the best fit stays on top is as good as random), ~12% grouping, ~25% the call itself (~0.6 us: the
// Python wrapper, the arguments, the two result arrays and the tuple, the radix counters to sum and clear).

#include <Python.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <new>
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

  // Clears r's word and its summary word whole: place() empties the set this way, through the rooms that bins
  // went low with (every value left is one of them), without a search.
  void clear_around(int64_t r) {
    words_[r >> 6] = 0;
    summary_[r >> 12] = 0;
  }

 private:
  std::vector<uint64_t> words_;
  std::vector<uint64_t> summary_;
};

// Per-thread scratch, grown on demand and reused. Between calls: low empty, head all -1, the counters zero.
struct Scratch {
  MaxRoomSet low;                // the rooms below the current length (see place())
  std::vector<int32_t> head;     // head[r]: the bin on top of room r's stack, or -1        (budget + 1)
  std::vector<int32_t> below;    // below[b]: the bin under b in its room's stack, or -1    (n: bins <= n)
  std::vector<int32_t> lowered;  // the rooms that bins went low with, in order             (n)
  std::vector<uint64_t> fits;    // the stack of the bins that fit, under the top           (n + 1)
  std::vector<int32_t> bin_of;   // bin_of[i]: the bin of sequence i                        (n)
  std::vector<int32_t> count;    // the grouping's counters                                 (2 * bins)
  std::vector<uint64_t> keys;    // radix sort keys and their ping-pong buffer               (2n)
  std::vector<int32_t> hist;     // the radix counters        ((passes - 1) * 2**digit + 2 * the top digit's values)
};

thread_local Scratch scratch;  // reached once per call: each access to a thread_local costs a call in a .so

template <typename T>
T* grown(std::vector<T>& v, size_t size) {
  if (v.size() < size) v.resize(size);
  return v.data();
}

// Counters kept zero at rest: each use leaves the ones it used zero when done. Clearing them right before counting
// costs more than its stores: the first counts wait for the zeros to be written out (~0.1 us a call).
int32_t* zero_at_rest(std::vector<int32_t>& counters, size_t size) { return grown(counters, size); }

// Grows the scratch for n sequences (the budget's part grows in place()).
void reserve(Scratch& s, size_t n) {
  grown(s.keys, 2 * n), grown(s.below, n), grown(s.lowered, n), grown(s.fits, n + 1), grown(s.bin_of, n);
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

// The index of the first length outside [0, budget], or -1 (for the error message: the sort checks the range).
int64_t first_out_of_range(const Lengths& lengths, int64_t budget) {
  for (int64_t i = 0; i < lengths.n; ++i) {
    if (static_cast<uint64_t>(lengths[i]) > static_cast<uint64_t>(budget)) return i;  // negative ones wrap
  }
  return -1;
}

// A stable counting sort of n items by bucket (0 <= bucket(k) < buckets), as two halves of the items,
// interleaved, each with its own counters: an increment of a counter waits on the one before it when they are
// close together, and half the items per counter halves that wait where the buckets are few or uneven (the top
// radix digit, the bins: ~20% of either). counters: 2 * buckets, zero (see zero_at_rest()). count(), then first(b)
// is bucket b's first slot, then scatter() calls emit(slot, k) for each item k and leaves the counters zero.
class TwoHalfCountingSort {
 public:
  TwoHalfCountingSort(int32_t* counters, size_t buckets, int64_t n)
      : first_(counters), second_(counters + buckets), buckets_(buckets), n_(n), half_(n / 2) {}

  template <typename Bucket>
  void count(Bucket bucket) {
    for (int64_t k = 0; k < half_; ++k) {
      ++first_[bucket(k)];
      ++second_[bucket(half_ + k)];
    }
    if (n_ % 2) ++second_[bucket(n_ - 1)];
    // each bucket's first slot, for the first half's items, then for the second half's (unrolled, like the
    // other sums of counters: they run ~30% faster 4 buckets a step)
    int32_t sum = 0;
#pragma GCC unroll 4
    for (size_t b = 0; b < buckets_; ++b) {
      const int32_t in_first = first_[b];
      first_[b] = sum;
      sum += in_first;
      const int32_t in_second = second_[b];
      second_[b] = sum;
      sum += in_second;
    }
  }

  int32_t first(size_t b) const { return first_[b]; }

  template <typename Bucket, typename Emit>
  void scatter(Bucket bucket, Emit emit) {
    for (int64_t k = 0; k < half_; ++k) {
      emit(first_[bucket(k)]++, k);
      emit(second_[bucket(half_ + k)]++, half_ + k);
    }
    if (n_ % 2) emit(second_[bucket(n_ - 1)]++, n_ - 1);
    std::fill(first_, second_ + buckets_, 0);
  }

 private:
  int32_t* first_;   // counters for the items [0, half_)
  int32_t* second_;  // counters for the items [half_, n_)
  size_t buckets_;
  int64_t n_;
  int64_t half_;
};

// The keys (budget - length) << 32 | index of all lengths, sorted into decreasing length, then increasing index:
// an LSD radix sort of budget - length in Passes digits of Digit bits, a compile-time constant (the digit is then
// a shift and a mask by constants: ~10% of the sort at n = 200). The lower digits are counted in one read of the
// lengths, with the range check (a pass of its own costs ~0.1 us at n = 200). The top digit takes fewer buckets
// (budget >> its shift, + 1) and has the most sequences per bucket (the lengths cluster): a TwoHalfCountingSort.
// keys and tmp hold n keys each; returns the one that holds the result, or nullptr when a length is outside
// [0, budget].
template <int Passes, int Digit>
uint64_t* radix_sort(Scratch& s, const Lengths& lengths, int64_t budget, uint64_t* keys, uint64_t* tmp) {
  constexpr uint64_t kMask = (uint64_t{1} << Digit) - 1;
  constexpr size_t kBuckets = size_t{1} << Digit;
  constexpr int kTopShift = 32 + (Passes - 1) * Digit;
  const int64_t n = lengths.n;
  const size_t top_buckets = static_cast<size_t>(budget >> (kTopShift - 32)) + 1;
  int32_t* hist = zero_at_rest(s.hist, (Passes - 1) * kBuckets + 2 * top_buckets);
  const Lengths in = lengths;  // a local copy: the stores below could alias the caller's, so it would be re-read
  bool out_of_range = false;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t key = static_cast<uint64_t>(budget) - static_cast<uint64_t>(in[i]);
    out_of_range |= key > static_cast<uint64_t>(budget);  // a negative length or one above the budget
    keys[i] = key << 32 | static_cast<uint64_t>(i);
    for (int p = 0; p < Passes - 1; ++p) ++hist[p * kBuckets + ((key >> (p * Digit)) & kMask)];
  }
  if (out_of_range) {
    std::fill(hist, hist + (Passes - 1) * kBuckets, 0);
    return nullptr;
  }
  for (int p = 0; p < Passes - 1; ++p) {
    int32_t* h = hist + p * kBuckets;
    int32_t sum = 0;  // each digit's first slot
#pragma GCC unroll 4
    for (size_t d = 0; d < kBuckets; ++d) {
      const int32_t c = h[d];
      h[d] = sum;
      sum += c;
    }
    for (int64_t k = 0; k < n; ++k) tmp[h[(keys[k] >> (32 + p * Digit)) & kMask]++] = keys[k];
    std::fill(h, h + kBuckets, 0);
    std::swap(keys, tmp);
  }
  TwoHalfCountingSort top(hist + (Passes - 1) * kBuckets, top_buckets, n);
  const auto top_digit = [keys](int64_t k) { return keys[k] >> kTopShift; };
  top.count(top_digit);
  top.scatter(top_digit, [keys, tmp](int32_t slot, int64_t k) { tmp[slot] = keys[k]; });
  return tmp;
}

template <int Digit>
uint64_t* radix_sort_in_passes(int passes, Scratch& s, const Lengths& lengths, int64_t budget, uint64_t* keys,
                               uint64_t* tmp) {
  constexpr int kMaxPasses = (25 + Digit - 1) / Digit;  // budget <= 2**24: budget - length < 2**25
  switch (passes) {
    case 2: return radix_sort<2, Digit>(s, lengths, budget, keys, tmp);
    case 3: return radix_sort<std::min(3, kMaxPasses), Digit>(s, lengths, budget, keys, tmp);
    default: return radix_sort<std::min(4, kMaxPasses), Digit>(s, lengths, budget, keys, tmp);
  }
}

// Sorts in as few passes of at most 8 bits as budget - length needs (11 bits from 8192 sequences on, where their
// wider counters pay), the bits shared out evenly: a narrow top digit has few buckets for many sequences, and the
// counters to sum and clear grow as 2**bits (at budget 2**17 and n = 200, digits of 8 + 8 + 2 bits cost ~0.4 us
// more than 6 + 6 + 6).
[[gnu::noinline]] uint64_t* sort_keys(Scratch& s, const Lengths& lengths, int64_t budget, uint64_t* keys,
                                      uint64_t* tmp) {
  const int bits = 64 - __builtin_clzll(static_cast<uint64_t>(budget));  // budget - length < 2**bits
  const int max_digit = lengths.n >= 8192 ? 11 : 8;
  const int passes = (bits + max_digit - 1) / max_digit;
  if (passes == 1) return radix_sort<1, 1>(s, lengths, budget, keys, tmp);  // the top digit alone, any width
  switch ((bits + passes - 1) / passes) {  // 5 to 11 bits
    case 5: return radix_sort_in_passes<5>(passes, s, lengths, budget, keys, tmp);
    case 6: return radix_sort_in_passes<6>(passes, s, lengths, budget, keys, tmp);
    case 7: return radix_sort_in_passes<7>(passes, s, lengths, budget, keys, tmp);
    case 8: return radix_sort_in_passes<8>(passes, s, lengths, budget, keys, tmp);
    case 9: return radix_sort_in_passes<9>(passes, s, lengths, budget, keys, tmp);
    case 10: return radix_sort_in_passes<10>(passes, s, lengths, budget, keys, tmp);
    default: return radix_sort_in_passes<11>(passes, s, lengths, budget, keys, tmp);
  }
}

// An open bin of place(): room << 32 | bin in one word (one register: the placement loop has few to spare, and a
// spilled one costs a store and a load each placement).
uint64_t open_bin(int64_t room, int32_t bin) { return static_cast<uint64_t>(room) << 32 | static_cast<uint32_t>(bin); }
int64_t room_of(uint64_t open) { return static_cast<int64_t>(open >> 32); }
int32_t bin_of_open(uint64_t open) { return static_cast<int32_t>(open & 0xffffffffu); }

// Places the sequences of keys[0:n] (sorted) into bins; returns the number of bins. Fills bin_of.
//
// The lengths come in decreasing order, so a room that fits the current length fits every later one. The open
// bins are kept in two parts:
// - the bins whose room is >= the current length, on a stack in the order best fit picks them: the least room
//   on top, the most recent to reach it first on a tie. The top lives in a register, room and bin in one word: a
//   placement goes to it and either leaves it on top (what remains of the least room is still the least) or
//   sends it low; most leave it, and write nothing but bin_of and the slot above the stack (a search would wait
//   on what the placement before it wrote: that made most of the cost). Whatever joins the stack is below all of
//   it, so it goes on top: the low bins that the length drops to. At the bottom lies the next new bin, empty:
//   placing a sequence there opens it, and the next one goes under it (no branch: whether a bin opens is as good
//   as random).
// - the bins whose room is below the current length ("low"): their room values in a bitset that yields its
//   largest first, each value with the stack of its bins, head/below (most recent on top). The largest is kept
//   at hand, so most placements only compare it with the length.
[[gnu::noinline]] int32_t place(Scratch& s, const uint64_t* keys, int64_t n, int64_t budget) {
  s.low.reset(budget);
  if (static_cast<int64_t>(s.head.size()) < budget + 1) s.head.resize(budget + 1, -1);
  int32_t* head = s.head.data();
  int32_t* below = s.below.data();
  int32_t* lowered = s.lowered.data();
  int32_t* bin_of = s.bin_of.data();
  uint64_t* sp = s.fits.data();            // the stack under the top: [fits.data(), sp)
  uint64_t next_new = open_bin(budget, 0);  // the next new bin, empty
  uint64_t top = next_new;                  // the top of the stack, out of memory
  int64_t low_max = -1;                     // the largest low room, or -1
  int32_t* lowered_end = lowered;
  for (const uint64_t* key = keys; key != keys + n; ++key) {
    const int64_t len = budget - static_cast<int64_t>(*key >> 32);
    if (low_max >= len) {  // low rooms that now fit: onto the stack, largest first, each room's oldest bin first
      *sp++ = top;
      do {
        uint64_t* const first = sp;
        for (int32_t b = head[low_max]; b >= 0; b = below[b]) *sp++ = open_bin(low_max, b);
        std::reverse(first, sp);
        head[low_max] = -1;
        low_max = s.low.pop(low_max);
      } while (low_max >= len);
      top = *--sp;
    }
    const bool opens = top == next_new;
    next_new += opens;  // the next bin number
    *sp = next_new;     // under the one just opened
    sp += opens;
    const uint64_t placed = top - (static_cast<uint64_t>(len) << 32);  // the same bin, len less room
    const int64_t left = room_of(placed);
    if (left >= len) {  // still the least room that fits
      top = placed;
    } else {  // low from now on
      top = *--sp;
      const int32_t bin = bin_of_open(placed);
      s.low.insert(left);
      low_max = std::max(low_max, left);
      below[bin] = head[left];
      head[left] = bin;
      *lowered_end++ = static_cast<int32_t>(left);
    }
    bin_of[*key & 0xffffffffu] = bin_of_open(placed);
  }
  for (const int32_t* r = lowered; r != lowered_end; ++r) {  // leave the scratch clean: only low rooms were touched
    head[*r] = -1;
    s.low.clear_around(*r);
  }
  return bin_of_open(next_new);
}

// Groups the indices by bin, increasing index within a bin: writes indices[0:n] and offsets[0:bins + 1].
[[gnu::noinline]] void group(Scratch& s, int64_t n, int32_t bins, int64_t* indices, int64_t* offsets) {
  const int32_t* bin_of = s.bin_of.data();
  TwoHalfCountingSort by_bin(zero_at_rest(s.count, 2 * static_cast<size_t>(bins)), static_cast<size_t>(bins), n);
  const auto bin = [bin_of](int64_t i) { return bin_of[i]; };
  by_bin.count(bin);
  for (int32_t b = 0; b < bins; ++b) offsets[b] = by_bin.first(b);
  offsets[bins] = n;
  by_bin.scatter(bin, [indices](int32_t slot, int64_t i) { indices[slot] = i; });
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
      throw py::type_error("pack_bfd: lengths must be a 1-D int64 buffer, " + what);
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

std::string repr(PyObject* obj) { return py::repr(obj).cast<std::string>(); }

// The budget argument: an exact int in [1, kMaxBudget]; any other type is a TypeError (pack_sequences then
// converts it the way the Python packer checks it: NumPy integers yes, bools no).
int64_t budget_arg(PyObject* obj) {
  if (!PyLong_CheckExact(obj)) throw py::type_error("pack_bfd: budget must be an int, got " + repr(obj));
  int overflow = 0;
  const long long budget = PyLong_AsLongLongAndOverflow(obj, &overflow);
  if (overflow != 0 || budget < 1 || budget > kMaxBudget) {
    throw py::value_error("pack_bfd: budget must be in [1, 2**24], got " + repr(obj));
  }
  return budget;
}

py::tuple pack_bfd(PyObject* lengths_obj, PyObject* budget_obj) {
  const int64_t budget = budget_arg(budget_obj);
  const LengthsArg arg(lengths_obj);
  const Lengths& lengths = arg.lengths();
  const int64_t n = lengths.n;
  if (n > kMaxLengths) throw py::value_error("pack_bfd: at most 2**31 - 2 lengths, got " + std::to_string(n));
  Scratch& s = scratch;
  // -1: a length is out of range. No lengths, no bins, and no sort: a thread's scratch that never held a key has
  // no key storage, and sort_keys' null result would read as an out-of-range length.
  int32_t bins = n == 0 ? 0 : -1;
  // sort_keys, place and group stay out of line ([[gnu::noinline]]): inlined into one function, their loops
  // compete for registers (~0.08 us more at n = 200)
  if (n > 0) {
    run_released_from(n, [&] {
      reserve(s, static_cast<size_t>(n));
      const uint64_t* sorted = sort_keys(s, lengths, budget, s.keys.data(), s.keys.data() + n);
      if (sorted) bins = place(s, sorted, n, budget);
    });
  }
  if (bins < 0) {
    const int64_t bad = first_out_of_range(lengths, budget);
    throw py::value_error("pack_bfd: lengths[" + std::to_string(bad) + "] = " + std::to_string(lengths[bad]) +
                          " is outside [0, budget=" + std::to_string(budget) + "]");
  }
  py::object indices = new_int64_array(n);
  py::object offsets = new_int64_array(static_cast<int64_t>(bins) + 1);
  int64_t* indices_data = array_data(indices);
  int64_t* offsets_data = array_data(offsets);
  run_released_from(n, [&] { group(s, n, bins, indices_data, offsets_data); });
  return py::make_tuple(std::move(indices), std::move(offsets));
}

// pack_bfd as a plain CPython function (METH_FASTCALL, positional arguments only): pybind11's dispatcher, which
// matches the arguments against each overload and converts them, would add ~0.1 us to each call. C++ exceptions
// become Python ones here.
PyObject* pack_bfd_fastcall(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  try {
    if (nargs != 2) throw py::type_error("pack_bfd: takes 2 positional arguments, got " + std::to_string(nargs));
    return pack_bfd(args[0], args[1]).release().ptr();
  } catch (py::error_already_set& error) {
    error.restore();
  } catch (const py::builtin_exception& error) {  // py::type_error, py::value_error
    error.set_error();
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
  }
  return nullptr;
}

PyMethodDef pack_bfd_def = {
    "pack_bfd", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(pack_bfd_fastcall)), METH_FASTCALL,
    "pack_bfd(lengths, budget, /)\n--\n\n"
    "Best-fit-decreasing packing (see veofast/data/packing.py). lengths: a 1-D int64 buffer (n,), each in "
    "[0, budget], read in place; budget: an int in [1, MAX_BUDGET]. Returns (indices int64 (n,), offsets int64 "
    "(bins + 1,)): bin b holds indices[offsets[b]:offsets[b + 1]]. TypeError for lengths that are not a 1-D "
    "int64 buffer and for a budget that is not an int."};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "veofast C++ extension: the dynamic-batching packer.";
  m.attr("MAX_BUDGET") = kMaxBudget;
  PyObject* pack = PyCFunction_NewEx(&pack_bfd_def, m.ptr(), m.attr("__name__").ptr());
  if (!pack) throw py::error_already_set();
  m.attr("pack_bfd") = py::reinterpret_steal<py::object>(pack);
}
