// Python bindings of the rANS coder: idemrt._engine.rans.
//
// Arrays come in through the buffer protocol as C-contiguous int32 (numpy arrays, or anything
// numpy can view such as CPU torch tensors); only lossless dtype conversions are accepted. The
// GIL is released while coding. Errors in the data raise ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.hpp"
#include "rans.hpp"

namespace py = pybind11;

namespace idemrt {
namespace {

using rans::CdfTable;
using IntArray = py::array_t<int32_t, py::array::c_style>;
using TablePtr = std::shared_ptr<CdfTable>;

std::shared_ptr<CdfTable> make_table(const IntArray& cdfs, const IntArray& lengths,
                                     const IntArray& offsets) {
    if (cdfs.ndim() != 2) throw std::invalid_argument("cdfs must be a 2-D array");
    if (lengths.ndim() != 1 || offsets.ndim() != 1)
        throw std::invalid_argument("cdf_lengths and offsets must be 1-D arrays");
    const auto n = static_cast<size_t>(cdfs.shape(0));
    if (static_cast<size_t>(lengths.shape(0)) != n || static_cast<size_t>(offsets.shape(0)) != n)
        throw std::invalid_argument("cdfs has " + std::to_string(n) + " rows but cdf_lengths has " +
                                    std::to_string(lengths.shape(0)) + " and offsets " +
                                    std::to_string(offsets.shape(0)) + " entries");
    py::gil_scoped_release release;
    return std::make_shared<CdfTable>(cdfs.data(), n, static_cast<size_t>(cdfs.shape(1)),
                                      lengths.data(), offsets.data());
}

struct EncodeJob {
    const int32_t* symbols;
    const int32_t* indexes;
    size_t n;
    const CdfTable* table;
    std::vector<uint32_t> words;

    EncodeJob(const IntArray& s, const IntArray& i, const TablePtr& t)
        : symbols(s.data()), indexes(i.data()), n(static_cast<size_t>(s.size())), table(t.get()) {
        if (s.size() != i.size())
            throw std::invalid_argument(std::to_string(s.size()) + " symbols but " +
                                        std::to_string(i.size()) + " indexes");
        if (!table) throw std::invalid_argument("CDF table is None");
    }
    void run() { words = rans::encode(symbols, indexes, n, *table); }
    py::bytes result() const {
        return py::bytes(reinterpret_cast<const char*>(words.data()), 4 * words.size());
    }
};

struct DecodeJob {
    const uint8_t* data;
    size_t n_bytes;
    const int32_t* indexes;
    size_t n;
    const CdfTable* table;
    IntArray values;  // shaped like the indexes
    int32_t* out;

    DecodeJob(const py::bytes& string, const IntArray& i, const TablePtr& t)
        : indexes(i.data()), n(static_cast<size_t>(i.size())), table(t.get()),
          values(std::vector<py::ssize_t>(i.shape(), i.shape() + i.ndim())) {
        if (!table) throw std::invalid_argument("CDF table is None");
        char* buffer;
        Py_ssize_t size;
        if (PyBytes_AsStringAndSize(string.ptr(), &buffer, &size) != 0) throw py::error_already_set();
        data = reinterpret_cast<const uint8_t*>(buffer);
        n_bytes = static_cast<size_t>(size);
        out = values.mutable_data();
    }
    // Runs without the GIL: only touches the raw buffers.
    void run() { rans::decode(data, n_bytes, indexes, n, *table, out); }
};

// Builds one job per stream, naming the stream in argument errors.
template <class Job, class Inputs>
std::vector<Job> make_jobs(const Inputs& inputs, const std::vector<IntArray>& indexes,
                           const std::vector<TablePtr>& tables) {
    std::vector<Job> jobs;
    jobs.reserve(inputs.size());
    for (size_t i = 0; i < inputs.size(); ++i) {
        try {
            jobs.emplace_back(inputs[i], indexes[i], tables[i]);
        } catch (const std::invalid_argument& e) {
            throw std::invalid_argument("stream " + std::to_string(i) + ": " + e.what());
        }
    }
    return jobs;
}

void check_same_count(size_t streams, size_t n, const char* what) {
    if (streams != n)
        throw std::invalid_argument(std::string("expected one ") + what + " per stream, got " +
                                    std::to_string(n) + " for " + std::to_string(streams) + " streams");
}

py::bytes encode_one(const IntArray& symbols, const IntArray& indexes, const TablePtr& table) {
    EncodeJob job(symbols, indexes, table);
    {
        py::gil_scoped_release release;
        job.run();
    }
    return job.result();
}

IntArray decode_one(const py::bytes& string, const IntArray& indexes, const TablePtr& table) {
    DecodeJob job(string, indexes, table);
    {
        py::gil_scoped_release release;
        job.run();
    }
    return job.values;
}

py::list encode_batch(const std::vector<IntArray>& symbols, const std::vector<IntArray>& indexes,
                      const std::vector<TablePtr>& tables, int num_threads) {
    check_same_count(symbols.size(), indexes.size(), "index array");
    check_same_count(symbols.size(), tables.size(), "CDF table");
    auto jobs = make_jobs<EncodeJob>(symbols, indexes, tables);
    {
        py::gil_scoped_release release;
        parallel_for(jobs.size(), num_threads, [&](size_t i) { jobs[i].run(); });
    }
    py::list out;
    for (const auto& job : jobs) out.append(job.result());
    return out;
}

py::list decode_batch(const std::vector<py::bytes>& strings, const std::vector<IntArray>& indexes,
                      const std::vector<TablePtr>& tables, int num_threads) {
    check_same_count(strings.size(), indexes.size(), "index array");
    check_same_count(strings.size(), tables.size(), "CDF table");
    auto jobs = make_jobs<DecodeJob>(strings, indexes, tables);
    {
        py::gil_scoped_release release;
        parallel_for(jobs.size(), num_threads, [&](size_t i) { jobs[i].run(); });
    }
    py::list out;
    for (const auto& job : jobs) out.append(job.values);
    return out;
}

}  // namespace

void register_rans(py::module_& parent) {
    auto m = parent.def_submodule(
        "rans", "compressai-compatible rANS entropy coder (16-bit CDFs, 64-bit state, 32-bit words)");

    py::class_<CdfTable, std::shared_ptr<CdfTable>>(m, "CdfTable",
                                                    "Validated CDF table (compressai layout)")
        .def(py::init(&make_table), py::arg("cdfs"), py::arg("cdf_lengths"), py::arg("offsets"),
             "cdfs: int32 [n, max_len] quantized CDFs; cdf_lengths, offsets: int32 [n]")
        .def("__len__", &CdfTable::size);

    m.def("encode", &encode_one, py::arg("symbols"), py::arg("indexes"), py::arg("table"),
          "Encode int32 symbols, each with the CDF of the same position in indexes, to bytes.");
    m.def("decode", &decode_one, py::arg("string"), py::arg("indexes"), py::arg("table"),
          "Decode one stream; returns int32 symbols shaped like indexes.");
    m.def("encode_batch", &encode_batch, py::arg("symbols"), py::arg("indexes"), py::arg("tables"),
          py::arg("num_threads") = 0,
          "Encode independent streams in parallel (num_threads <= 0: all hardware threads).");
    m.def("decode_batch", &decode_batch, py::arg("strings"), py::arg("indexes"), py::arg("tables"),
          py::arg("num_threads") = 0, "Decode independent streams in parallel.");
}

}  // namespace idemrt
