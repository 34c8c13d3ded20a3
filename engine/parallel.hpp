// Run independent tasks 0..n-1 on a few std::threads (one task at a time per thread).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace idemrt {

// num_threads <= 0 means one thread per hardware thread. Task exceptions are collected and the
// one of the lowest task is rethrown after all threads joined; std::invalid_argument messages
// are prefixed with "stream <i>: " so that the caller can tell which input was bad.
template <class Task>
void parallel_for(size_t n, int num_threads, Task&& task) {
    size_t threads = num_threads > 0 ? static_cast<size_t>(num_threads)
                                     : std::max(1u, std::thread::hardware_concurrency());
    threads = std::min(threads, n);

    std::vector<std::exception_ptr> errors(n);
    std::atomic<size_t> next{0};
    auto worker = [&] {
        for (size_t i; (i = next.fetch_add(1)) < n;) {
            try {
                task(i);
            } catch (const std::invalid_argument& e) {
                errors[i] = std::make_exception_ptr(
                    std::invalid_argument("stream " + std::to_string(i) + ": " + e.what()));
            } catch (...) {
                errors[i] = std::current_exception();
            }
        }
    };

    if (threads <= 1) {
        worker();
    } else {
        std::vector<std::thread> pool;
        pool.reserve(threads - 1);
        for (size_t t = 1; t < threads; ++t) pool.emplace_back(worker);
        worker();  // the calling thread works too
        for (auto& th : pool) th.join();
    }
    for (const auto& e : errors)
        if (e) std::rethrow_exception(e);
}

}  // namespace idemrt
