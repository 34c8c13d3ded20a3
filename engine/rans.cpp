#include "rans.hpp"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

#include "rans64.hpp"

namespace idemrt::rans {
namespace {

// compressai computes the chunk count with a 32-bit shift loop that only terminates for
// raw < 2^28 (7 chunks), and its decoder accumulates raw in an int32: stay inside that range
// so every stream we write is one compressai can read.
constexpr uint32_t kMaxBypassChunks = 7;
constexpr uint64_t kMaxRaw = 1ull << (kBypassBits * kMaxBypassChunks);

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

const CdfTable::Cdf& checked_cdf(int32_t idx, const CdfTable& table, size_t pos) {
    if (idx < 0 || static_cast<size_t>(idx) >= table.size())
        fail("CDF index " + std::to_string(idx) + " at position " + std::to_string(pos) +
             " is outside the table of " + std::to_string(table.size()) + " CDFs");
    return table.entries()[idx];
}

}  // namespace

CdfTable::CdfTable(const int32_t* cdfs, size_t n_cdfs, size_t row_stride,
                   const int32_t* lengths, const int32_t* offsets) {
    if (n_cdfs == 0) fail("CDF table is empty");
    if (row_stride < 2) fail("CDF rows need at least 2 entries");
    constexpr int32_t total = int32_t{1} << kPrecision;
    constexpr size_t n_buckets = size_t{1} << kLutBits;

    size_t total_length = 0;
    for (size_t i = 0; i < n_cdfs; ++i) {
        const int32_t len = lengths[i];
        if (len < 2 || static_cast<size_t>(len) > row_stride)
            fail("CDF " + std::to_string(i) + " has length " + std::to_string(len) +
                 ", outside [2, " + std::to_string(row_stride) + "]");
        total_length += static_cast<size_t>(len);
    }
    // Sized once: entries_ keeps pointers into these buffers.
    cdf_.resize(total_length);
    lut_.resize(n_cdfs * (n_buckets + 1));
    entries_.resize(n_cdfs);

    uint32_t* dst = cdf_.data();
    for (size_t i = 0; i < n_cdfs; ++i) {
        const int32_t len = lengths[i];
        const int32_t* row = cdfs + i * row_stride;
        if (row[0] != 0 || row[len - 1] != total)
            fail("CDF " + std::to_string(i) + " does not run from 0 to 2^16");
        for (int32_t j = 1; j < len; ++j)
            if (row[j] <= row[j - 1]) fail("CDF " + std::to_string(i) + " is not strictly increasing");
        std::copy(row, row + len, dst);

        // A strictly increasing CDF from 0 to 2^16 has at most 2^16 symbols: uint16 holds them.
        uint16_t* lut = lut_.data() + i * (n_buckets + 1);
        uint32_t s = 0;
        for (size_t b = 0; b < n_buckets; ++b) {
            const int32_t slot = static_cast<int32_t>(b << (kPrecision - kLutBits));
            while (row[s + 1] <= slot) ++s;
            lut[b] = static_cast<uint16_t>(s);
        }
        lut[n_buckets] = static_cast<uint16_t>(len - 2);

        entries_[i] = {dst, lut, len - 2, offsets[i]};
        dst += len;
    }
}

std::vector<uint32_t> encode(const int32_t* symbols, const int32_t* indexes, size_t n,
                             const CdfTable& table) {
    WordSink words;
    words.reserve(n / 2 + 16);
    uint64_t x = kRansL;

    // rANS is last-in first-out: code backwards so that the decoder reads forwards.
    for (size_t i = n; i-- > 0;) {
        const CdfTable::Cdf& c = checked_cdf(indexes[i], table, i);
        const int32_t max_value = c.max_value;
        int64_t value = int64_t{symbols[i]} - c.offset;

        if (value < 0 || value >= max_value) {
            const uint64_t raw = value < 0 ? static_cast<uint64_t>(-2 * value - 1)
                                           : static_cast<uint64_t>(2 * (value - max_value));
            if (raw >= kMaxRaw)
                fail("symbol " + std::to_string(symbols[i]) + " at position " +
                     std::to_string(i) + " is too far outside its CDF for bypass coding");
            uint32_t n_chunks = 0;
            while ((raw >> (kBypassBits * n_chunks)) != 0) ++n_chunks;
            // Decoded as: count, then chunks from least significant up; so push in reverse.
            for (uint32_t j = n_chunks; j-- > 0;)
                x = enc_put_bits(x, static_cast<uint32_t>(raw >> (kBypassBits * j)) & kMaxBypassChunk,
                                 words);
            x = enc_put_bits(x, n_chunks, words);
            value = max_value;
        }
        x = enc_put(x, c.cdf[value], c.cdf[value + 1] - c.cdf[value], words);
    }

    words.push_back(static_cast<uint32_t>(x >> 32));
    words.push_back(static_cast<uint32_t>(x));
    std::reverse(words.begin(), words.end());
    return words;
}

void decode(const uint8_t* data, size_t n_bytes, const int32_t* indexes, size_t n,
            const CdfTable& table, int32_t* out) {
    if (n_bytes % 4 != 0) fail("rANS stream length " + std::to_string(n_bytes) +
                               " is not a multiple of 4 bytes");
    WordSource in(data, n_bytes / 4);
    uint64_t x = dec_init(in);
    constexpr uint32_t slot_mask = (1u << kPrecision) - 1;

    for (size_t i = 0; i < n; ++i) {
        const CdfTable::Cdf& c = checked_cdf(indexes[i], table, i);
        const int32_t max_value = c.max_value;

        const uint32_t s = c.find(static_cast<uint32_t>(x) & slot_mask);
        x = dec_advance(x, c.cdf[s], c.cdf[s + 1] - c.cdf[s], in);

        int64_t value = s;
        if (value == max_value) {
            const uint32_t n_chunks = dec_get_bits(x, in);
            if (n_chunks > kMaxBypassChunks) fail("rANS stream has an invalid bypass length");
            uint64_t raw = 0;
            for (uint32_t j = 0; j < n_chunks; ++j)
                raw |= uint64_t{dec_get_bits(x, in)} << (kBypassBits * j);
            value = (raw & 1) ? -static_cast<int64_t>(raw >> 1) - 1
                              : static_cast<int64_t>(raw >> 1) + max_value;
        }
        const int64_t symbol = value + c.offset;
        if (symbol < std::numeric_limits<int32_t>::min() ||
            symbol > std::numeric_limits<int32_t>::max())
            fail("rANS stream decodes to a symbol outside int32");
        out[i] = static_cast<int32_t>(symbol);
    }

    if (!in.exhausted() || x != kRansL)
        fail("rANS stream is corrupt or does not match its indexes (" +
             std::string(in.exhausted() ? "bad final state" : "trailing data") + ")");
}

}  // namespace idemrt::rans
