// compressai-compatible rANS coding of int32 symbols with per-symbol CDF indexes.
//
// Stream format (compressai.ans, v1.2.x): 16-bit CDFs, 64-bit rANS state, 32-bit words. A
// symbol s coded with CDF i has value v = s - offset[i]; CDF i has max_value = length[i] - 2
// regular values [0, max_value), and max_value is the escape: values outside that range are
// coded as max_value followed, in 4-bit bypass chunks, by the chunk count n and the n chunks of
// raw = (v < 0) ? -2v - 1 : 2(v - max_value), least significant chunk first.
//
// Everything here throws std::invalid_argument on bad input (ValueError in Python) and never
// reads outside its buffers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace idemrt::rans {

// Validated copy of compressai's (_quantized_cdf, _cdf_length, _offset) buffers plus a coarse
// slot -> symbol lookup table per CDF for decoding.
class CdfTable {
public:
    static constexpr uint32_t kLutBits = 8;

    struct Cdf {
        const uint32_t* cdf;  // max_value + 2 entries, 0 ... 2^16
        // lut[b] is the symbol containing slot b << (16 - kLutBits), lut[2^kLutBits] the last
        // symbol: every slot of bucket b belongs to a symbol in [lut[b], lut[b + 1]].
        const uint16_t* lut;
        int32_t max_value;  // the escape symbol; regular values are [0, max_value)
        int32_t offset;     // symbol = value + offset

        // The symbol s with cdf[s] <= slot < cdf[s + 1].
        uint32_t find(uint32_t slot) const {
            uint32_t lo = lut[slot >> (16 - kLutBits)], hi = lut[(slot >> (16 - kLutBits)) + 1];
            while (lo < hi) {  // usually lo == hi already
                const uint32_t mid = (lo + hi + 1) / 2;
                if (cdf[mid] <= slot)
                    lo = mid;
                else
                    hi = mid - 1;
            }
            return lo;
        }
    };

    // cdfs: row-major [n_cdfs, row_stride]; lengths, offsets: [n_cdfs].
    CdfTable(const int32_t* cdfs, size_t n_cdfs, size_t row_stride, const int32_t* lengths,
             const int32_t* offsets);
    CdfTable(const CdfTable&) = delete;  // entries_ point into the other members
    CdfTable& operator=(const CdfTable&) = delete;

    size_t size() const { return entries_.size(); }
    const Cdf* entries() const { return entries_.data(); }

private:
    std::vector<uint32_t> cdf_;  // the rows, each cut to its length
    std::vector<uint16_t> lut_;
    std::vector<Cdf> entries_;
};

// Encode n symbols; returns the stream as words (write them out little-endian).
std::vector<uint32_t> encode(const int32_t* symbols, const int32_t* indexes, size_t n,
                             const CdfTable& table);

// Decode n symbols from a stream of n_bytes bytes into out. The stream must be exactly one
// whole encoded stream: a valid stream leaves the decoder in the encoder's initial state with
// every word consumed, anything else (truncation, trailing bytes, corruption that happens to
// stay in bounds) is rejected.
void decode(const uint8_t* data, size_t n_bytes, const int32_t* indexes, size_t n,
            const CdfTable& table, int32_t* out);

}  // namespace idemrt::rans
