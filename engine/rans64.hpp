// 64-bit rANS primitives, written after Fabian 'ryg' Giesen's public-domain rans64.h
// (https://github.com/rygorous/ryg_rans), plus the raw-bits extension that compressai's
// rans_interface.cpp uses for its bypass mode.
//
// State x lives in [L, 2^63) with L = 2^31 and is renormalised by whole 32-bit words, so the
// byte stream is a sequence of little-endian uint32 words. The encoder runs backwards over the
// symbols; WordSink collects the words in emission order and the caller reverses them once at
// the end (instead of ryg's pointer walking down a pre-sized buffer, which needs an upper
// bound on the stream size that compressai gets wrong for very short inputs).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the rANS stream layout is defined as little-endian uint32 words"
#endif

namespace idemrt::rans {

constexpr uint64_t kRansL = 1ull << 31;  // lower bound of the normalisation interval
constexpr uint32_t kPrecision = 16;      // probabilities are integers summing to 2^16
constexpr uint32_t kBypassBits = 4;      // compressai's bypass_precision
constexpr uint32_t kMaxBypassChunk = (1u << kBypassBits) - 1;

using WordSink = std::vector<uint32_t>;

// Encode one symbol occupying [start, start + freq) out of 2^kPrecision.
inline uint64_t enc_put(uint64_t x, uint32_t start, uint32_t freq, WordSink& out) {
    // x_max = ((L >> precision) << 32) * freq: after the push, x stays below 2^63.
    const uint64_t x_max = ((kRansL >> kPrecision) << 32) * freq;
    if (x >= x_max) {
        out.push_back(static_cast<uint32_t>(x));
        x >>= 32;
    }
    return ((x / freq) << kPrecision) + (x % freq) + start;
}

// Push kBypassBits raw bits (compressai's Rans64EncPutBits with nbits = 4).
inline uint64_t enc_put_bits(uint64_t x, uint32_t value, WordSink& out) {
    const uint64_t x_max = ((kRansL >> kPrecision) << 32) << (kPrecision - kBypassBits);
    if (x >= x_max) {
        out.push_back(static_cast<uint32_t>(x));
        x >>= 32;
    }
    return (x << kBypassBits) | value;
}

// Bounds-checked forward reader over the little-endian words of a stream.
class WordSource {
public:
    WordSource(const uint8_t* data, size_t n_words) : data_(data), n_words_(n_words) {}

    uint32_t next() {
        if (pos_ >= n_words_) throw std::invalid_argument("rANS stream is truncated");
        uint32_t w;
        std::memcpy(&w, data_ + 4 * pos_, 4);
        ++pos_;
        return w;
    }

    bool exhausted() const { return pos_ == n_words_; }

private:
    const uint8_t* data_;
    size_t n_words_;
    size_t pos_ = 0;
};

inline uint64_t dec_init(WordSource& in) {
    const uint64_t lo = in.next();
    const uint64_t hi = in.next();
    return lo | (hi << 32);
}

// Pop the symbol [start, start + freq) whose slot is x & (2^kPrecision - 1).
inline uint64_t dec_advance(uint64_t x, uint32_t start, uint32_t freq, WordSource& in) {
    constexpr uint64_t mask = (1ull << kPrecision) - 1;
    x = freq * (x >> kPrecision) + (x & mask) - start;
    if (x < kRansL) x = (x << 32) | in.next();
    return x;
}

inline uint32_t dec_get_bits(uint64_t& x, WordSource& in) {
    const uint32_t value = static_cast<uint32_t>(x & kMaxBypassChunk);
    x >>= kBypassBits;
    if (x < kRansL) x = (x << 32) | in.next();
    return value;
}

}  // namespace idemrt::rans
