"""More tests of the micrograph readers (stemfast.io and the modules below it): byte order, which
series' calibration, memory checks before decompression, frames= selections, calibrations and units."""
from __future__ import annotations

import json
import tracemalloc
import warnings

import numpy as np
import pytest
import tifffile

from io_checks import read_error
from stemfast.io import ReadWarning, read


@pytest.fixture
def stack():
    rng = np.random.default_rng(2)
    return rng.normal(100.0, 10.0, (3, 40, 56)).astype(np.float32)


_err = read_error  # the ReadError read() must raise, naming the file


# ---------------------------------------------------------------------------------------------
# TIFF
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_a_big_endian_uncompressed_stack_is_read_in_its_byte_order(tmp_path, stack, dtype):
    """tifffile gives a series' dtype in the native byte order: the memory map of an uncompressed
    big-endian stack must be made in the file's order, or every value is byte-swapped garbage."""
    data = (stack * 10).astype(dtype)
    tifffile.imwrite(tmp_path / "be.tif", data, byteorder=">", photometric="minisblack")
    mg = read(tmp_path / "be.tif")
    np.testing.assert_array_equal(mg.data, data.astype(np.float32))
    np.testing.assert_array_equal(read(tmp_path / "be.tif", frames=1).data, data[1].astype(np.float32))
    np.testing.assert_array_equal(read(tmp_path / "be.tif", frames=[2, 0]).data, data[[2, 0]].astype(np.float32))


def _thumbnail_first(path, img, main_tags=(), **main):
    """A TIFF of two series: a 4x smaller thumbnail first (calibrated 0.08 nm per pixel in cm resolution
    tags), then the image itself (``main``: its own resolution tags; ``main_tags``: extra tags)."""
    with tifffile.TiffWriter(path) as w:
        w.write(img[::4, ::4].copy(), resolution=(1e7 / 0.08, 1e7 / 0.08), resolutionunit="CENTIMETER", metadata=None)
        w.write(img, metadata=None, extratags=list(main_tags), **main)
    return path


@pytest.mark.parametrize("parser", ["rsciio's own parser", "its public reader"])
def test_the_calibration_is_the_series_reads_not_a_thumbnails_before_it(tmp_path, parser, monkeypatch):
    """The largest series is read; its calibration is that of its own first page (and, through
    RosettaSciIO, of that series), not of page 0, a thumbnail 4x coarser."""
    img = np.random.default_rng(0).normal(100.0, 10.0, (128, 128)).astype(np.float32)
    with pytest.warns(ReadWarning, match="series 1, the largest"):
        mg = read(_thumbnail_first(tmp_path / "a.tif", img, resolution=(1e7 / 0.02, 1e7 / 0.02),
                                   resolutionunit="CENTIMETER"))
    assert mg.data.shape == (128, 128) and mg.pixel_size == pytest.approx(0.02) and mg.unit == "nm"
    pytest.importorskip("rsciio.tiff")
    if parser == "its public reader":  # a version whose parser takes other arguments
        from rsciio.tiff import _api

        original = _api._parse_scale_unit
        monkeypatch.setattr(_api, "_parse_scale_unit", lambda *args: original(*args))
    dm = [(65003, "s", 0, "nm", False), (65004, "s", 0, "nm", False),
          (65009, "d", 1, 0.0165, False), (65010, "d", 1, 0.0165, False)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReadWarning)
        mg = read(_thumbnail_first(tmp_path / "dm.tif", img, dm, resolutionunit="NONE"))
    assert mg.pixel_size == pytest.approx(0.0165) and mg.metadata["calibration_from"] == "RosettaSciIO's TIFF reader"


# ---------------------------------------------------------------------------------------------
# memory: checked from the header, before a compressed array is decompressed
# ---------------------------------------------------------------------------------------------
def _ndata(path, arr, props, compression):
    """A Nion Swift ``.ndata`` data item: a zip of data.npy and metadata.json."""
    import io as _bio
    import zipfile

    buf = _bio.BytesIO()
    np.save(buf, arr)
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        z.writestr("data.npy", buf.getvalue())
        z.writestr("metadata.json", json.dumps(props))
    return path


def _hspy(path, arr):
    from rsciio.hspy import file_writer

    axes = [{"name": n, "size": arr.shape[i], "scale": 0.02, "offset": 0.0, "units": "nm", "navigate": False,
             "index_in_array": i} for i, n in enumerate("yx")]
    file_writer(str(path), {
        "data": arr, "axes": axes, "metadata": {"General": {"title": "HAADF"}, "Signal": {"signal_type": ""}},
        "original_metadata": {}, "attributes": {"_lazy": False}, "tmp_parameters": {}, "models": {},
        "learning_results": {}, "package_info": {"name": "x", "version": "0"}}, compression="gzip")
    return path


@pytest.mark.parametrize("kind", ["npz", "npz without an 'image' entry", "ndata", "hspy"])
def test_a_small_compressed_file_is_refused_from_its_header_before_it_is_decompressed(tmp_path, monkeypatch, kind):
    """A 2048 x 2048 float32 image of zeros compresses to a few kB: beyond the memory limit, it is refused
    from the shape and type its header declares, before any of its 16 MB is decompressed (traced peak)."""
    import zipfile

    big = np.zeros((2048, 2048), np.float32)
    if kind.startswith("npz"):
        p = tmp_path / "a.npz"
        np.savez_compressed(p, **({"image": big} if kind == "npz" else {"x": np.arange(3.0), "scan": big}))
    elif kind == "ndata":
        props = {"title": "HAADF", "datum_dimension_count": 2, "collection_dimension_count": 0}
        p = _ndata(tmp_path / "a.ndata", big, props, zipfile.ZIP_DEFLATED)
    else:
        pytest.importorskip("rsciio.hspy")
        import dask.array  # noqa: F401  (imported before the trace: its reader computes through dask)

        p = _hspy(tmp_path / "a.hspy", big)
    monkeypatch.setenv("STEMFAST_MEMORY_LIMIT_MB", "8")
    tracemalloc.start()
    try:
        e = _err(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "2048 x 2048 px (float32)" in str(e) and str(e).count("cannot read") == 1
    assert peak < 6 * 2**20, f"{peak / 2**20:.1f} MB allocated before the refusal"
    monkeypatch.setenv("STEMFAST_MEMORY_LIMIT_MB", "1024")  # with the memory, read as before
    assert read(p).data.shape == (2048, 2048)


def test_nan_padding_in_a_memory_mapped_stack_is_filled_only_where_the_whole_stack_fits(tmp_path, monkeypatch):
    """A float32 .npy stack is memory-mapped and its memory checked for one frame at a time; NaN padding
    is filled in a float32 copy of the whole stack: beyond the memory limit, a ReadError saying so, not a
    copy of the whole stack after all."""
    rng = np.random.default_rng(3)
    st = rng.normal(100.0, 10.0, (40, 128, 128)).astype(np.float32)  # 2.6 MB
    st[:, :16] = np.nan  # each frame's padding: a region without data
    np.save(tmp_path / "pad.npy", st)
    monkeypatch.setenv("STEMFAST_MEMORY_LIMIT_MB", "2")  # one frame's analysis fits, a copy of all of them not
    with pytest.warns(ReadWarning, match="all in regions without data"):  # one frame: filled as before
        assert np.isfinite(read(tmp_path / "pad.npy", frames=0).data).all()
    e = _err(tmp_path / "pad.npy")
    assert "NaN or infinite values are filled in a copy of the whole stack" in str(e) and "40 frames" in str(e)
    monkeypatch.setenv("STEMFAST_MEMORY_LIMIT_MB", "64")
    with pytest.warns(ReadWarning, match="all in regions without data"):
        mg = read(tmp_path / "pad.npy")
    assert mg.data.shape == st.shape and np.isfinite(mg.data).all()
    np.testing.assert_array_equal(mg.data[:, 16:], st[:, 16:])


def test_a_compressed_tiffs_frames_selection_gets_the_whole_arrays_verdict(tmp_path):
    """A compressed TIFF's selected pages are decoded alone; the whole series is judged first, as an
    uncompressed one's or a .npy's: [y, x, channels] refused with or without frames=, narrow frames said."""
    si = np.random.default_rng(0).random((64, 72, 16)).astype(np.float32)
    tifffile.imwrite(tmp_path / "si_z.tif", si, compression="zlib", photometric="minisblack")
    for frames in (None, 0, slice(0, 2), [1, 0]):
        assert "reads as [y, x, channels] (64 x 72 px, 16 channels" in str(_err(tmp_path / "si_z.tif", frames=frames))
    tifffile.imwrite(tmp_path / "yxt_z.tif", np.zeros((264, 260, 65), np.uint16), compression="zlib",
                     photometric="minisblack")
    with pytest.warns(ReadWarning, match=r"read as 264 frames of 260 x 65 px"):
        assert read(tmp_path / "yxt_z.tif", frames=0).data.shape == (260, 65)


# ---------------------------------------------------------------------------------------------
# frames=
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames", [True, "1", b"1", ["1"], [True, False, True], [0, True],
                                    np.array([True, False, True]), [0.5], slice(0, 3, 0)])
@pytest.mark.parametrize("ext", ["npy", "tif", "h5"])
def test_booleans_text_and_fractions_are_no_frame_numbers(tmp_path, stack, frames, ext):
    """frames= takes an int, a slice or a sequence of ints: True is not frame 1, a mask is not the frames
    0 and 1, "1" is not frame 1, 0.5 is not frame 0; each is a ReadError saying what frames= takes."""
    p = tmp_path / f"s.{ext}"
    if ext == "npy":
        np.save(p, stack)
    elif ext == "tif":
        tifffile.imwrite(p, stack, compression="zlib", photometric="minisblack")  # read page by page
    else:
        h5py = pytest.importorskip("h5py")
        with h5py.File(p, "w") as f:
            f.create_dataset("s", data=stack)
    e = _err(p, frames=frames)
    assert "frames" in str(e) and ("sequence of ints" in str(e) or "no selection of frames" in str(e))
    if isinstance(frames, list) and isinstance(frames[-1], bool):
        assert "numpy.flatnonzero(mask)" in str(e)
    np.testing.assert_array_equal(read(p, frames=[2.0, 0]).data, stack[[2, 0]])  # whole floats, as before


@pytest.mark.parametrize("frames", [slice(None, None, -1), slice(4, 0, -2), slice(-1, -4, -1), slice(3, None, -3)])
def test_hdf5_reads_descending_frame_slices_as_npy_and_tiff_do(tmp_path, frames):
    """h5py refuses a negative step ('Step must be >= 1'), which made the file 'unreadable or corrupt';
    the frames are read ascending and reversed, the same as from a .npy."""
    h5py = pytest.importorskip("h5py")
    st = np.random.default_rng(1).normal(50.0, 5.0, (5, 32, 48)).astype(np.float32)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.create_dataset("s", data=st)
    np.save(tmp_path / "s.npy", st)
    mg = read(tmp_path / "s.h5", frames=frames)
    np.testing.assert_array_equal(mg.data, st[frames])
    np.testing.assert_array_equal(mg.data, read(tmp_path / "s.npy", frames=frames).data)


def test_hdf5_frames_are_refused_from_the_selections_size_before_they_are_read(tmp_path, monkeypatch):
    """A compressed HDF5 stack read with frames=: the selection's memory is checked from the dataset's
    shape before h5py decompresses it (traced peak), as the whole dataset's is without frames=."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "z.h5", "w") as f:
        f.create_dataset("s", shape=(8, 1024, 1024), dtype="f4", chunks=(1, 256, 256), compression="gzip",
                         fillvalue=0.0)
    monkeypatch.setenv("STEMFAST_MEMORY_LIMIT_MB", "48")  # two frames' analysis fits (44 MiB), eight not (92)
    for frames in (slice(None), [0, 1, 2, 3, 4, 5, 6, 7]):
        tracemalloc.start()
        try:
            e = _err(tmp_path / "z.h5", frames=frames)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert "1024 x 1024 px x 8 frames (float32)" in str(e) and peak < 3 * 2**20, peak
    assert read(tmp_path / "z.h5", frames=slice(0, 2)).data.shape == (2, 1024, 1024)  # what fits is read


# ---------------------------------------------------------------------------------------------
# calibrations and units
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entries", [{"pixel_size": np.array([1.5]), "unit": "A"}, {"pixel_size": 1.5, "unit": b"A"},
                                     {"pixel_size": 1.5, "unit": np.array(["A"])},
                                     {"pixel_size_A": np.array([[1.5]])}, {"pixel_size": np.array([b"1.5"]), "unit": "A"}])
def test_npz_calibration_entries_of_one_value_in_an_array_or_as_bytes(tmp_path, entries):
    """A 1-element array's value is the pixel size (it made the whole file 'unreadable or corrupt'); a unit
    in bytes is decoded (it gave the unit "np.bytes_(b'A')"), one in a 1-element array taken out."""
    img = np.random.default_rng(0).normal(100.0, 10.0, (40, 56)).astype(np.float32)
    np.savez(tmp_path / "a.npz", image=img, **entries)
    mg = read(tmp_path / "a.npz")
    assert mg.pixel_size == pytest.approx(0.15) and mg.unit == "nm"


@pytest.mark.parametrize("entries, shown", [({"pixel_size": np.array([1.5, 1.5]), "unit": "A"}, "[1.5, 1.5]"),
                                            ({"pixel_size": "about 1.5", "unit": "A"}, "'about 1.5'"),
                                            ({"pixel_size": 1.5, "unit": np.array(["A", "A"])}, "['A', 'A']")])
def test_npz_calibration_entries_that_are_not_one_value_are_said(tmp_path, entries, shown):
    img = np.random.default_rng(0).normal(100.0, 10.0, (40, 56)).astype(np.float32)
    np.savez(tmp_path / "a.npz", image=img, **entries)
    with pytest.warns(ReadWarning, match="its calibration is not used") as seen:
        mg = read(tmp_path / "a.npz")
    assert mg.pixel_size is None and mg.unit is None
    assert shown in str(seen[0].message) and shown in mg.metadata["calibration_dropped"]


@pytest.mark.parametrize("doc, said", [({"pixel_size": 1.2}, "a pixel size (1.2) without a unit"),
                                       ({"pixel_size": 1.2, "unit": None}, "a pixel size (1.2) without a unit"),
                                       ({"field_of_view_x": 56.0}, "a pixel size (1) without a unit"),
                                       ({"pixel_size": 0.5, "unit": "m"}, "5e+08 nm per pixel, is no micrograph's")])
def test_a_sidecar_pixel_size_without_a_unit_or_out_of_range_is_not_used_and_said(tmp_path, doc, said):
    """A sidecar's pixel size without a unit is no calibration (it was kept with the unit None, which the
    analysis takes as nm); one of 0.5 m is no micrograph's (the file's own calibration gets that check;
    the sidecar's did not): neither is used, a ReadWarning names the sidecar and why."""
    img = np.random.default_rng(0).normal(100.0, 10.0, (40, 56)).astype(np.float32)
    np.save(tmp_path / "a.npy", img)
    (tmp_path / "a.json").write_text(json.dumps(doc))
    with pytest.warns(ReadWarning, match="a.json: ") as seen:
        mg = read(tmp_path / "a.npy")
    assert any(said in str(w.message) for w in seen), [str(w.message) for w in seen]
    assert mg.pixel_size is None and mg.unit is None and mg.metadata["sidecar"]["used"] is False
    assert mg.metadata["sidecar"].get("calibration_dropped") or mg.metadata["sidecar"].get("calibration_ignored")


def test_a_tiff_json_description_with_a_null_unit_is_not_calibrated_and_said(tmp_path):
    img = np.random.default_rng(0).normal(100.0, 10.0, (40, 56)).astype(np.float32)
    tifffile.imwrite(tmp_path / "a.tif", img, description=json.dumps({"pixel_size": 0.5, "unit": None}))
    with pytest.warns(ReadWarning, match=r"a pixel size \(0.5\) without a unit"):
        mg = read(tmp_path / "a.tif")
    assert mg.pixel_size is None and mg.unit is None and "without a unit" in mg.metadata["calibration_dropped"]
    tifffile.imwrite(tmp_path / "b.tif", img, description=json.dumps({"pixel_size": 0.5}))  # no unit key: nm, as before
    assert read(tmp_path / "b.tif").pixel_size_nm == pytest.approx(0.5)


@pytest.mark.parametrize("how", ["fixed-length bytes", "variable-length UTF-8 text"])
def test_an_hdf5_unit_in_latin1_is_decoded_as_latin1(tmp_path, how):
    """b"\\xb5m" (µm in Latin-1, as older software writes it) is no UTF-8: it was decoded with replacement
    characters ("\\ufffdm", or h5py's escaped "\\udcb5m"), a unit no table knows, so the pixel size stayed in
    an unknown unit. It is Latin-1's µm: 0.002 µm = 2 nm."""
    h5py = pytest.importorskip("h5py")
    img = np.random.default_rng(0).normal(100.0, 10.0, (40, 56)).astype(np.float32)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        d = f.create_dataset("img", data=img)
        d.attrs["pixel_size"] = 0.002
        if how == "fixed-length bytes":
            d.attrs["unit"] = np.bytes_(b"\xb5m")
        else:
            d.attrs.create("unit", data=b"\xb5m", dtype=h5py.string_dtype("utf-8"))
    mg = read(tmp_path / "a.h5")
    assert mg.pixel_size == pytest.approx(2.0) and mg.unit == "nm"


def test_an_imagej_unit_with_a_zero_resolution_is_said(tmp_path):
    """An ImageJ TIFF with the unit "micron" and XResolution 0/1 meant a calibration it does not give: read
    without one, as before, and now said (a ReadWarning, metadata["calibration_dropped"])."""
    img = np.random.default_rng(0).normal(100.0, 10.0, (40, 56)).astype(np.float32)
    tifffile.imwrite(tmp_path / "a.tif", img, imagej=True, resolution=(1.0, 1.0), metadata={"unit": "micron"})
    with tifffile.TiffFile(tmp_path / "a.tif", mode="r+") as t:
        t.pages[0].tags["XResolution"].overwrite((0, 1))
    with pytest.warns(ReadWarning, match=r"its ImageJ unit is 'micron' but its XResolution \(0/1\) gives no pixels"):
        mg = read(tmp_path / "a.tif")
    assert mg.pixel_size is None and "XResolution (0/1)" in mg.metadata["calibration_dropped"]


@pytest.mark.parametrize("unit, nm", [("micrometers", 1e3), ("Micrometres", 1e3), ("picometres", 1e-3),
                                      ("millimeters", 1e6), ("metres", 1e9), ("Ångströms", 0.1)])
def test_spelled_out_units_are_lengths(tmp_path, unit, nm):
    """ImageJ and other writers spell units out: "micrometers" was kept as an unknown unit (no
    calibration in nm), while "micrometer" was known."""
    from stemfast.io import unit_to_nm

    assert unit_to_nm(unit) == nm
    img = np.random.default_rng(0).normal(100.0, 10.0, (40, 56)).astype(np.float32)
    escaped = "".join(c if ord(c) < 128 else f"\\u{ord(c):04X}" for c in unit)  # ImageJ's header is ASCII
    tifffile.imwrite(tmp_path / "a.tif", img, imagej=True, resolution=(2.0, 2.0), metadata={"unit": escaped})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReadWarning)  # a metre per pixel is no micrograph's: said
        mg = read(tmp_path / "a.tif")
    if 0.5 * nm <= 1e6:
        assert mg.pixel_size == pytest.approx(0.5 * nm) and mg.unit == "nm"
    else:
        assert mg.pixel_size is None and mg.metadata["calibration_ignored"]["pixel_size_nm"] == pytest.approx(0.5 * nm)


def test_some_frames_of_a_rescaled_stack_are_read_in_the_whole_stacks_units(tmp_path):
    """float64 values near 1e9 are rescaled by the minimum and range of what is read; frames read apart
    (frames=, a Dask chunk) with the whole stack's rescaling are the whole stack's frames, bit for bit."""
    a = np.random.default_rng(0).normal(size=(4, 32, 32)) * np.array([1.0, 1.0, 3.0, 3.0])[:, None, None] + 1e9
    np.save(tmp_path / "s.npy", a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReadWarning)
        whole = read(tmp_path / "s.npy")
        own = read(tmp_path / "s.npy", frames=slice(0, 2))
    part = read(tmp_path / "s.npy", frames=slice(0, 2), rescale=whole.metadata["rescaled"])
    assert np.array_equal(part.data, whole.data[:2]) and not np.allclose(own.data, whole.data[:2])
    assert part.metadata["rescaled"]["offset"] == whole.metadata["rescaled"]["offset"] == float(a.min())
    assert "rescaled" not in read(tmp_path / "s.npy", frames=slice(2, 4), rescale=False).metadata
    with pytest.raises(ValueError, match="scale > 0"):
        read(tmp_path / "s.npy", rescale={"offset": 0.0, "scale": 0.0})
