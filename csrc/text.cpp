// format_csv_rows: the text of sites.csv rows, formatted in parallel (contract:
// python/stemfast/_kernels/__init__.py; reference: python/stemfast/_kernels/numpy_ref/text.py).
// Floats as printf's %.*g (std::to_chars with a precision is specified as exactly that, and is
// correctly rounded like Python's float formatting), NaN as "nan" whatever its sign bit (Python's
// "%g" % nan), integers in decimal; rows are formatted in blocks on the worker threads and joined.
#include "common.hpp"

#include <charconv>
#include <cstdio>
#include <string>

#include <pybind11/stl.h>

namespace stemfast {
namespace {

enum Kind { kF8 = 0, kF6 = 1, kInt = 2, kBool = 3, kCode = 4, kEmpty = 5 };

struct Column {
    int kind;
    const double* f = nullptr;
    const std::int64_t* i = nullptr;
    const std::uint8_t* b = nullptr;
    const std::vector<std::string>* vocab = nullptr;
};

inline void put_float(std::string& out, double v, int prec) {
    if (std::isnan(v)) {
        out += "nan";
        return;
    }
    char buf[64];
#if defined(__cpp_lib_to_chars) && __cpp_lib_to_chars >= 201611L
    const auto r = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::general, prec);
    out.append(buf, r.ptr);
#else
    const int n = std::snprintf(buf, sizeof(buf), "%.*g", prec, v);
    out.append(buf, static_cast<size_t>(n));
#endif
}

inline void put_int(std::string& out, std::int64_t v) {
    char buf[24];
    const auto r = std::to_chars(buf, buf + sizeof(buf), v);
    out.append(buf, r.ptr);
}

}  // namespace

py::str format_csv_rows(std::int64_t n_rows, py::sequence columns, std::vector<int> kinds, py::sequence vocabs) {
    if (n_rows < 0) throw py::value_error("format_csv_rows: n_rows must be >= 0");
    const size_t nc = kinds.size();
    if (static_cast<size_t>(py::len(columns)) != nc || static_cast<size_t>(py::len(vocabs)) != nc)
        throw py::value_error("format_csv_rows: columns, kinds and vocabs must have the same length");
    std::vector<py::array> keep;
    std::vector<std::vector<std::string>> vocab_store(nc);
    std::vector<Column> cols(nc);
    for (size_t c = 0; c < nc; ++c) {
        Column& col = cols[c];
        col.kind = kinds[c];
        py::handle h = columns[c];
        // the column as a C-contiguous array of T with n_rows values, kept alive for the call
        auto data = [&](auto tag, const char* what) {
            using T = decltype(tag);
            auto a = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(h);
            if (!a) throw py::value_error(std::string("format_csv_rows: a ") + what + " column must be numeric");
            if (a.ndim() != 1 || a.shape(0) != n_rows)
                throw py::value_error("format_csv_rows: every column must have n_rows values");
            keep.push_back(a);
            return a.data();
        };
        switch (col.kind) {
            case kF8:
            case kF6: col.f = data(double{}, "float"); break;
            case kBool: col.b = data(std::uint8_t{}, "bool"); break;
            case kInt:
            case kCode: {
                col.i = data(std::int64_t{}, "integer");
                if (col.kind == kCode) {
                    vocab_store[c] = py::cast<std::vector<std::string>>(vocabs[c]);
                    col.vocab = &vocab_store[c];
                    const auto nv = static_cast<std::int64_t>(vocab_store[c].size());
                    for (std::int64_t r = 0; r < n_rows; ++r)
                        if (col.i[r] < 0 || col.i[r] >= nv) throw py::value_error("format_csv_rows: code out of range");
                }
                break;
            }
            case kEmpty: break;
            default: throw py::value_error("format_csv_rows: unknown cell kind");
        }
    }
    constexpr std::int64_t kBlock = 2048;  // rows per block of text
    const std::int64_t nb = (n_rows + kBlock - 1) / kBlock;
    std::vector<std::string> blocks(static_cast<size_t>(nb));
    {
        py::gil_scoped_release release;
        parallel_for(nb, [&](std::int64_t b0, std::int64_t b1) {
            for (std::int64_t blk = b0; blk < b1; ++blk) {
                std::string& out = blocks[static_cast<size_t>(blk)];
                const std::int64_t r0 = blk * kBlock, r1 = std::min(n_rows, r0 + kBlock);
                out.reserve(static_cast<size_t>(r1 - r0) * nc * 10);
                for (std::int64_t r = r0; r < r1; ++r) {
                    for (size_t c = 0; c < nc; ++c) {
                        if (c) out += ',';
                        const Column& col = cols[c];
                        switch (col.kind) {
                            case kF8: put_float(out, col.f[r], 8); break;
                            case kF6: put_float(out, col.f[r], 6); break;
                            case kInt: put_int(out, col.i[r]); break;
                            case kBool: out += col.b[r] ? '1' : '0'; break;
                            case kCode: out += (*col.vocab)[static_cast<size_t>(col.i[r])]; break;
                            default: break;
                        }
                    }
                    out += '\n';
                }
            }
        }, 1);
    }
    size_t total = 0;
    for (const auto& s : blocks) total += s.size();
    std::string text;
    text.reserve(total);
    for (auto& s : blocks) {
        text += s;
        std::string().swap(s);
    }
    return py::str(text);
}

void register_text(py::module_& m) {
    m.def("format_csv_rows", &format_csv_rows, py::arg("n_rows"), py::arg("columns"), py::arg("kinds"),
          py::arg("vocabs"), "The CSV text of n_rows rows (see stemfast._kernels for the contract).");
}

}  // namespace stemfast
