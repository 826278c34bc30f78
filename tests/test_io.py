"""Tests of stemfast.io: round trips, calibration, stacks, validation errors, folder listing."""
from __future__ import annotations

import json
import os
import warnings
import pickle
import sys

import numpy as np
import pytest
import tifffile

from stemfast.io import (
    SUPPORTED_EXTENSIONS,
    Micrograph,
    ReadError,
    ReadWarning,
    find_micrographs,
    read,
    unit_to_nm,
    write_tiff,
)
from io_checks import read_error


@pytest.fixture
def img():
    rng = np.random.default_rng(0)
    return rng.normal(100.0, 10.0, (40, 56)).astype(np.float32)


@pytest.fixture
def stack():
    rng = np.random.default_rng(1)
    return rng.normal(50.0, 5.0, (5, 32, 48)).astype(np.float32)


_err = read_error  # the ReadError read() must raise, naming the file


# ---------------------------------------------------------------------------------------------
# TIFF
# ---------------------------------------------------------------------------------------------
def test_tiff_roundtrip_with_calibration(tmp_path, img):
    p = write_tiff(tmp_path / "a.tif", img, pixel_size=0.0123, unit="nm")
    mg = read(p)
    assert isinstance(mg, Micrograph)
    np.testing.assert_array_equal(mg.data, img)
    assert mg.data.dtype == np.float32 and not mg.is_stack and mg.n_frames == 1
    assert mg.shape2d == (40, 56)
    assert mg.pixel_size == pytest.approx(0.0123, rel=1e-7) and mg.unit == "nm"
    assert mg.path == str(p)
    json.dumps(mg.metadata)
    np.testing.assert_array_equal(mg.frame(0), img)
    assert [f.shape for f in mg.frames()] == [(40, 56)]


@pytest.mark.parametrize("unit,factor", [("A", 0.1), ("Å", 0.1), ("pm", 1e-3), ("µm", 1e3), ("um", 1e3)])
def test_tiff_units_converted_to_nm(tmp_path, img, unit, factor):
    p = write_tiff(tmp_path / "u.tif", img, pixel_size=1.5, unit=unit)
    mg = read(p)
    assert mg.unit == "nm" and mg.pixel_size == pytest.approx(1.5 * factor, rel=1e-7)
    assert mg.pixel_size_nm == pytest.approx(1.5 * factor, rel=1e-7)


def test_tiff_imagej_escaped_micron_unit(tmp_path, img):
    # how ImageJ/Fiji store "µm" in the description
    p = tmp_path / "fiji.tif"
    tifffile.imwrite(p, img, imagej=True, resolution=(1 / 0.002, 1 / 0.002),
                     metadata={"unit": "\\u00B5m"})
    mg = read(p)
    assert mg.unit == "nm" and mg.pixel_size == pytest.approx(2.0, rel=1e-6)


def test_tiff_without_calibration(tmp_path, img):
    p = tmp_path / "plain.tif"
    tifffile.imwrite(p, img)  # resolution 1/1, no unit
    mg = read(p)
    assert mg.pixel_size is None and mg.unit is None
    p2 = tmp_path / "dpi.tif"
    tifffile.imwrite(p2, img, resolution=(72, 72), resolutionunit="INCH")  # print resolution
    assert read(p2).pixel_size is None


def test_tiff_centimetre_resolution_and_json_description(tmp_path, img):
    p = tmp_path / "cm.tif"
    tifffile.imwrite(p, img, resolution=(1e7 / 0.05, 1e7 / 0.05), resolutionunit="CENTIMETER")
    mg = read(p)
    assert mg.unit == "nm" and mg.pixel_size == pytest.approx(0.05, rel=1e-6)
    p2 = tmp_path / "json.tif"
    tifffile.imwrite(p2, img, description=json.dumps({"pixel_size": 1.1, "unit": "A"}))
    mg2 = read(p2)
    assert mg2.unit == "nm" and mg2.pixel_size == pytest.approx(0.11)


def test_tiff_stack_roundtrip_lazy(tmp_path, stack):
    p = write_tiff(tmp_path / "s.tif", stack, pixel_size=0.02)
    mg = read(p)
    assert mg.is_stack and mg.n_frames == 5 and mg.shape2d == (32, 48) and len(mg) == 5
    assert isinstance(mg.data, np.memmap)  # uncompressed float32 stack is memory-mapped
    frames = list(mg.frames())
    assert len(frames) == 5
    for f, ref in zip(frames, stack):
        assert type(f) is np.ndarray and f.dtype == np.float32
        np.testing.assert_array_equal(f, ref)
    np.testing.assert_array_equal(mg.frame(-1), stack[-1])
    with pytest.raises(IndexError):
        mg.frame(5)
    assert mg.pixel_size == pytest.approx(0.02) and mg.unit == "nm"
    # frame selection at read time
    one = read(p, frames=2)
    assert not one.is_stack
    np.testing.assert_array_equal(one.data, stack[2])
    np.testing.assert_array_equal(read(p, frames=[4, 0]).data, stack[[4, 0]])
    np.testing.assert_array_equal(read(p, frames=slice(1, 4, 2)).data, stack[1:4:2])
    _err(p, frames=7)


def test_tiff_compressed_multipage_integer_stack(tmp_path, stack):
    data = (stack * 100).astype(np.uint16)
    p = tmp_path / "c.tiff"
    tifffile.imwrite(p, data, compression="zlib", photometric="minisblack")
    mg = read(p)
    assert mg.data.dtype == np.float32 and mg.data.shape == data.shape
    np.testing.assert_array_equal(mg.data, data.astype(np.float32))
    np.testing.assert_array_equal(read(p, frames=[3, 1]).data, data[[3, 1]].astype(np.float32))
    np.testing.assert_array_equal(read(p, frames=-1).data, data[-1].astype(np.float32))


def test_tiff_uppercase_extension(tmp_path, img):
    p = write_tiff(tmp_path / "UP.TIF", img)
    np.testing.assert_array_equal(read(p).data, img)


def test_rgb_converted_to_grey_with_warning(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)
    p = tmp_path / "rgb.tif"
    tifffile.imwrite(p, rgb, photometric="rgb")
    with pytest.warns(ReadWarning, match="grey"):
        mg = read(p)
    expect = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    assert mg.data.shape == (32, 40)
    np.testing.assert_allclose(mg.data, expect, rtol=1e-5)
    assert mg.metadata["converted_from_rgb"]["kind"] == "luminance"  # random colours: no colour map fits
    from stemfast.batch.inputs import describe_input

    assert "converted to grey" in describe_input(mg)["notes"][0]
    # RGBA in a .npy as well
    np.save(tmp_path / "rgba.npy", np.dstack([rgb, np.full((32, 40), 255, np.uint8)]))
    with pytest.warns(ReadWarning):
        mg2 = read(tmp_path / "rgba.npy")
    np.testing.assert_allclose(mg2.data, expect, rtol=1e-5)


@pytest.mark.parametrize("name, mode", [("grey.png", "L"), ("grey16.png", "I;16"), ("colour.png", "RGB"),
                                        ("palette.png", "P"), ("alpha.png", "LA"), ("grey.bmp", "L"),
                                        ("grey.jpg", "L")])
def test_exported_pictures_are_read_with_a_warning_that_they_are_no_data(tmp_path, name, mode):
    """A PNG, BMP or JPEG named as a file is read (grey levels as they are, colour and palettes made
    grey), with a warning that it holds display grey levels without calibration -- and for JPEG, that
    its lossy compression changes intensities -- which the batch's summary carries as a note."""
    from PIL import Image

    from stemfast.batch.inputs import describe_input

    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, (40, 48), dtype=np.uint8)
    im = {"L": lambda: Image.fromarray(grey), "I;16": lambda: Image.fromarray(grey.astype(np.uint16) * 257),
          "RGB": lambda: Image.fromarray(np.dstack([grey] * 3)), "P": lambda: Image.fromarray(grey).convert("P"),
          "LA": lambda: Image.fromarray(np.dstack([grey, np.full_like(grey, 200)]), mode="LA")}[mode]()
    im.save(tmp_path / name, **({"quality": 95} if name.endswith(".jpg") else {}))
    with pytest.warns(ReadWarning, match="exported") as rec:
        mg = read(tmp_path / name)
    assert mg.data.shape == (40, 48) and mg.data.dtype == np.float32 and mg.pixel_size is None
    lossy = name.endswith(".jpg")
    assert any("lossy" in str(w.message) for w in rec) == lossy
    if not lossy:  # the grey levels as stored (a palette's through its colours: the same greys)
        np.testing.assert_allclose(mg.data, grey.astype(np.float32) * (257 if mode == "I;16" else 1), atol=0.51)
    else:
        assert np.abs(mg.data - grey).mean() < 20
    notes = describe_input(mg)["notes"]
    assert "exported" in notes[0] and ("lossy" in notes[0]) == lossy
    assert find_micrographs(tmp_path) == []


def test_a_one_bit_picture_is_refused(tmp_path):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).random((32, 32)) > 0.5).save(tmp_path / "bw.png")
    with pytest.raises(ReadError, match="1-bit"):
        read(tmp_path / "bw.png")


@pytest.mark.parametrize("n, dtype", [(3, np.float32), (4, np.uint16)])
def test_planar_samples_of_a_short_series_are_frames_not_colour(tmp_path, n, dtype):
    """tifffile stores a [3, H, W] / [4, H, W] array as planar RGB(A) unless told otherwise: a short
    series of detector frames (16-bit, float) is read as its frames, with a warning, not averaged into
    one grey image; planar 8-bit samples stay colour."""
    rng = np.random.default_rng(4)
    frames = (rng.random((n, 32, 40)) * 1000).astype(dtype)
    p = tmp_path / "series.tif"
    tifffile.imwrite(p, frames, photometric="rgb", planarconfig="separate")
    with pytest.warns(ReadWarning, match=f"read as {n} frames"):
        mg = read(p)
    assert mg.data.shape == (n, 32, 40) and mg.metadata["planar_samples_as_frames"] is True
    from stemfast.batch.inputs import describe_input

    assert describe_input(mg)["notes"][0].startswith(f"the TIFF's {n} planar samples were read as {n} frames")
    np.testing.assert_array_equal(np.asarray(mg.data), frames.astype(np.float32))
    with pytest.warns(ReadWarning, match="frames"):
        np.testing.assert_array_equal(read(p, frames=1).data, frames[1].astype(np.float32))
    colour = (frames[:3] % 256).astype(np.uint8)
    tifffile.imwrite(p, colour, photometric="rgb", planarconfig="separate")
    with pytest.warns(ReadWarning, match="grey"):
        assert read(p).data.shape == (32, 40)


def test_the_largest_tiff_series_is_read_and_said(tmp_path, img):
    """A thumbnail stored before the micrograph is not what gets analysed; the choice is said (a
    ReadWarning, the metadata and the batch summary's notes)."""
    from stemfast.batch.inputs import describe_input

    p = tmp_path / "thumb_first.tif"
    with tifffile.TiffWriter(p) as t:
        t.write(img[::4, ::4].copy())
        t.write(img)
    with pytest.warns(ReadWarning, match="2 image series"):
        mg = read(p)
    np.testing.assert_array_equal(mg.data, img)
    assert mg.metadata["series"] == 1 and mg.metadata["n_series"] == 2
    assert describe_input(mg)["notes"] == ["the TIFF holds 2 image series; series 1, the largest, was read"]
    # a compressed stack after a thumbnail: frames are read from the stack's pages
    stack = np.stack([img, img + 1, img + 2])
    p2 = tmp_path / "thumb_stack.tif"
    with tifffile.TiffWriter(p2) as t:
        t.write(img[::4, ::4].copy())
        t.write(stack, compression="zlib", photometric="minisblack")
    with pytest.warns(ReadWarning, match="series 1"):
        np.testing.assert_array_equal(read(p2, frames=[2, 1]).data, stack[[2, 1]])
    one = write_tiff(tmp_path / "one.tif", img)  # one series: nothing to say
    assert "series" not in read(one).metadata and "notes" not in describe_input(read(one))

def test_write_tiff_is_atomic_and_overwrites(tmp_path, img):
    p = tmp_path / "w.tif"
    write_tiff(p, img)
    write_tiff(p, img + 1, pixel_size=0.1)
    np.testing.assert_array_equal(read(p).data, img + 1)
    with pytest.raises(ValueError):
        write_tiff(tmp_path / "bad.tif", np.zeros((2, 2, 16, 16)))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["w.tif"]  # no temp files left


# ---------------------------------------------------------------------------------------------
# NumPy, HDF5, MRC, RosettaSciIO
# ---------------------------------------------------------------------------------------------
def test_npy_roundtrip_and_lazy_stack(tmp_path, img, stack):
    np.save(tmp_path / "a.npy", img.astype(np.float64))
    mg = read(tmp_path / "a.npy")
    assert mg.data.dtype == np.float32 and not isinstance(mg.data, np.memmap)
    np.testing.assert_allclose(mg.data, img)
    assert mg.pixel_size is None
    np.save(tmp_path / "s.npy", stack)
    ms = read(tmp_path / "s.npy")
    assert isinstance(ms.data, np.memmap) and ms.n_frames == 5
    np.testing.assert_array_equal(np.stack(list(ms.frames())), stack)
    np.testing.assert_array_equal(read(tmp_path / "s.npy", frames=1).data, stack[1])


def test_integer_npy_converted_to_float32(tmp_path):
    data = np.arange(32 * 32, dtype=np.int32).reshape(32, 32)
    np.save(tmp_path / "i.npy", data)
    mg = read(tmp_path / "i.npy")
    assert mg.data.dtype == np.float32
    np.testing.assert_array_equal(mg.data, data.astype(np.float32))


def test_singleton_axes_are_dropped(tmp_path, img):
    np.save(tmp_path / "t.npy", img[:, :, None])
    np.save(tmp_path / "l.npy", img[None])
    for name in ("t.npy", "l.npy"):
        mg = read(tmp_path / name)
        assert mg.data.shape == img.shape and not mg.is_stack


def test_npz_named_and_first_array(tmp_path, img, stack):
    np.savez(tmp_path / "n.npz", other=np.zeros(3), image=img, pixel_size=0.5, unit="A")
    mg = read(tmp_path / "n.npz")
    np.testing.assert_array_equal(mg.data, img)
    assert mg.pixel_size == pytest.approx(0.05) and mg.unit == "nm"
    np.savez(tmp_path / "d.npz", data=stack)
    np.testing.assert_array_equal(read(tmp_path / "d.npz").data, stack)
    np.savez(tmp_path / "f.npz", img)  # arr_0
    np.testing.assert_array_equal(read(tmp_path / "f.npz").data, img)


def test_hdf5_roundtrip(tmp_path, img, stack):
    h5py = pytest.importorskip("h5py")
    p = tmp_path / "a.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("meta/scalar", data=1.0)
        g = f.create_group("entry")
        ds = g.create_dataset("stack", data=stack)
        ds.attrs["pixel_size"] = 1.2
        ds.attrs["unit"] = "A"
        f.create_dataset("other/image", data=img)
    mg = read(p)  # first 2-D/3-D dataset
    np.testing.assert_array_equal(mg.data, stack)
    assert mg.pixel_size == pytest.approx(0.12) and mg.unit == "nm"
    assert mg.metadata["dataset"] == "/entry/stack"
    np.testing.assert_array_equal(read(p, dataset="other/image").data, img)
    np.testing.assert_array_equal(read(p, frames=[3, 1]).data, stack[[3, 1]])
    e = _err(p, dataset="nope")
    assert "nope" in str(e)
    (tmp_path / "bad.hdf5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 20)
    _err(tmp_path / "bad.hdf5")


def test_hdf5_image_is_picked_over_a_channels_last_dataset(tmp_path, img):
    """A [y, x, channels] dataset (a spectrum image) stored before the image is passed over; alone in
    the file, it is read and refused as what it is, not as y frames of x by channels px."""
    h5py = pytest.importorskip("h5py")
    p = tmp_path / "si.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("a/spectrum_image", data=np.zeros((64, 72, 16), np.float32))
        f.create_dataset("b/haadf", data=img)
    mg = read(p)
    assert mg.metadata["dataset"] == "/b/haadf"
    np.testing.assert_array_equal(mg.data, img)
    q = tmp_path / "si_only.h5"
    with h5py.File(q, "w") as f:
        f.create_dataset("spectrum_image", data=np.zeros((64, 72, 16), np.float32))
    assert "reads as [y, x, channels] (64 x 72 px, 16 channels" in str(_err(q))


def test_a_frames_selection_gets_the_whole_arrays_verdict(tmp_path, img):
    """``frames=`` takes part of an array only after the whole array is judged: a [y, x, channels]
    array (.npy, HDF5 read lazily or whole) is refused with or without it -- a frame of it is no
    256 x 16 px image -- and frames 4x narrower than tall are warned of. An empty HDF5 dataset is no
    image: the file's image beside it is read."""
    h5py = pytest.importorskip("h5py")
    np.save(tmp_path / "si.npy", np.zeros((64, 72, 16), np.float32))
    for frames in (0, slice(0, 2), [1, 0]):
        assert "reads as [y, x, channels] (64 x 72 px, 16 channels" in str(_err(tmp_path / "si.npy", frames=frames))
    with h5py.File(tmp_path / "si.h5", "w") as f:
        f.create_dataset("spectrum_image", data=np.zeros((64, 72, 16), np.float32))
    for frames in (3, [0, 1]):
        assert "reads as [y, x, channels]" in str(_err(tmp_path / "si.h5", frames=frames))
    np.save(tmp_path / "yxt.npy", np.zeros((264, 260, 65), np.float32))
    with pytest.warns(ReadWarning, match=r"read as 264 frames of 260 x 65 px"):
        assert read(tmp_path / "yxt.npy", frames=0).data.shape == (260, 65)
    with h5py.File(tmp_path / "empty_first.h5", "w") as f:
        f.create_dataset("a/empty", data=np.zeros((0, 64, 64), np.float32))
        f.create_dataset("b/haadf", data=img)
    np.testing.assert_array_equal(read(tmp_path / "empty_first.h5").data, img)


def test_hdf5_missing_h5py_is_a_read_error(tmp_path, monkeypatch):
    p = tmp_path / "x.h5"
    p.write_bytes(b"not really hdf5")
    monkeypatch.setitem(sys.modules, "h5py", None)
    e = _err(p)
    assert "h5py" in str(e) and "stemfast[io]" in str(e)


def test_mrc_via_mrcfile(tmp_path, stack):
    mrcfile = pytest.importorskip("mrcfile")
    p = tmp_path / "a.mrc"
    with mrcfile.new(p) as m:
        m.set_data(stack)
        m.voxel_size = 1.5
    mg = read(p)
    np.testing.assert_array_equal(mg.data, stack)
    assert mg.pixel_size == pytest.approx(0.15) and mg.unit == "nm"


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.int16])
def test_an_mrc_stack_is_memory_mapped_and_read_a_frame_at_a_time(tmp_path, dtype):
    """An MRC stack (here with an extended header before its data) is kept as the file's memory map, as a
    .npy or TIFF one is, and its frames converted one at a time; ``frames=`` selects from the map. Before:
    every MRC file was read whole into memory (a 300-frame series cost its whole size in RAM)."""
    mrcfile = pytest.importorskip("mrcfile")
    data = _stack_of(dtype, 6)
    p = tmp_path / "s.mrc"
    with mrcfile.new(p) as m:
        m.set_data(data)
        m.set_extended_header(np.zeros(10, dtype=[("a", "<f4")]))
        m.voxel_size = 2.0
    mg = read(p)
    assert isinstance(mg.data, np.memmap) and mg.data.dtype == dtype and mg.n_frames == 6
    for i in range(6):
        np.testing.assert_array_equal(mg.frame(i), data[i].astype(np.float32))
    assert mg.pixel_size == pytest.approx(0.2) and mg.unit == "nm"
    part = read(p, frames=slice(2, 5))
    assert isinstance(part.data, np.memmap) and part.n_frames == 3
    np.testing.assert_array_equal(part.frame(0), data[2].astype(np.float32))
    np.testing.assert_array_equal(read(p, frames=4).data, data[4].astype(np.float32))


def test_emd_via_rosettasciio(tmp_path, stack):
    pytest.importorskip("h5py")
    emd = pytest.importorskip("rsciio.emd")
    p = tmp_path / "a.emd"
    axes = [{"name": "t", "size": 5, "navigate": True, "scale": 1.0, "units": "s", "offset": 0.0},
            {"name": "y", "size": 32, "navigate": False, "scale": 0.5, "units": "Å", "offset": 0.0},
            {"name": "x", "size": 48, "navigate": False, "scale": 0.5, "units": "Å", "offset": 0.0}]
    emd.file_writer(str(p), {"data": stack, "axes": axes, "original_metadata": {},
                             "metadata": {"General": {"title": "HAADF"}, "Signal": {"signal_type": ""}}})
    mg = read(p)
    np.testing.assert_array_equal(mg.data, stack)
    assert mg.pixel_size == pytest.approx(0.05) and mg.unit == "nm"
    np.testing.assert_array_equal(read(p, frames=2).data, stack[2])
    json.dumps(mg.metadata)


@pytest.mark.parametrize("version", [3, 4])
@pytest.mark.parametrize("kind", ["image", "stack"])
def test_digitalmicrograph_via_rosettasciio(tmp_path, img, stack, version, kind):
    """DM3 / DM4 (Gatan) through RosettaSciIO: data, calibration (Å -> nm), lazy frames of a stack."""
    pytest.importorskip("rsciio.digitalmicrograph")
    from dmfile import write_dm

    data = img if kind == "image" else stack
    p = write_dm(tmp_path / f"a.dm{version}", data, pixel_size=0.5, unit="Å", version=version)
    mg = read(p)
    np.testing.assert_array_equal(mg.data, data)
    assert mg.data.dtype == np.float32
    assert mg.pixel_size == pytest.approx(0.05) and mg.unit == "nm"
    assert mg.metadata["format"] == f"dm{version}"
    json.dumps(mg.metadata)
    if kind == "stack":
        assert mg.n_frames == len(stack)
        np.testing.assert_array_equal(read(p, frames=3).data, stack[3])


def test_truncated_digitalmicrograph_is_a_read_error(tmp_path, img):
    pytest.importorskip("rsciio.digitalmicrograph")
    from dmfile import write_dm

    p = write_dm(tmp_path / "t.dm4", img, pixel_size=0.5, unit="nm", version=4)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    e = _err(p)
    assert e.reason


@pytest.mark.parametrize("version", [0x0210, 0x0220])
@pytest.mark.parametrize("kind", ["image", "stack"])
def test_tia_ser_via_rosettasciio(tmp_path, img, stack, version, kind):
    """FEI/Thermo TIA .ser (no .emi) through RosettaSciIO: data, orientation, calibration m -> nm."""
    pytest.importorskip("rsciio.tia")
    from serfile import write_ser

    data = img if kind == "image" else stack
    pixel_size_m = 1.25e-10
    p = write_ser(tmp_path / "a.ser", data, pixel_size_m=pixel_size_m, version=version)
    mg = read(p)
    assert mg.data.dtype == np.float32
    np.testing.assert_array_equal(mg.data, data)  # exact, same orientation (rows not flipped)
    assert mg.pixel_size == pytest.approx(pixel_size_m * 1e9) and mg.unit == "nm"
    assert mg.metadata["format"] == "ser"
    json.dumps(mg.metadata)
    if kind == "stack":
        assert mg.n_frames == len(stack)
        np.testing.assert_array_equal(mg.frame(3), stack[3])
        np.testing.assert_array_equal(read(p, frames=3).data, stack[3])
    else:
        assert mg.n_frames == 1
        np.testing.assert_array_equal(mg.frame(0), img)


def test_truncated_tia_ser_is_a_read_error(tmp_path, stack):
    pytest.importorskip("rsciio.tia")
    from serfile import write_ser

    p = write_ser(tmp_path / "t.ser", stack, pixel_size_m=1e-10)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    e = _err(p)
    assert e.reason


@pytest.mark.parametrize("ext", [".dm4", ".dm3", ".emd", ".ser", ".emi"])
def test_missing_rosettasciio_is_a_read_error(tmp_path, monkeypatch, ext):
    p = tmp_path / f"x{ext}"
    p.write_bytes(b"\0" * 64)
    monkeypatch.setitem(sys.modules, "rsciio", None)
    e = _err(p)
    assert "stemfast[io]" in str(e) and "RosettaSciIO" in str(e) and ext in str(e)


def test_missing_mrc_readers_is_a_read_error(tmp_path, monkeypatch):
    p = tmp_path / "x.mrc"
    p.write_bytes(b"\0" * 2048)
    monkeypatch.setitem(sys.modules, "rsciio", None)
    monkeypatch.setitem(sys.modules, "mrcfile", None)
    assert "stemfast[io]" in str(_err(p))


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_read_error_type_and_message(tmp_path):
    e = _err(tmp_path / "missing.tif")
    assert isinstance(e, ValueError)
    assert e.reason == "file not found" and e.path.endswith("missing.tif")
    e2 = pickle.loads(pickle.dumps(e))
    assert str(e2) == str(e)


def test_error_directory_unsupported_and_empty_file(tmp_path):
    (tmp_path / "d.tif").mkdir()
    assert "directory" in str(_err(tmp_path / "d.tif"))
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    assert "unsupported" in str(_err(tmp_path / "x.gif"))
    (tmp_path / "x.png").write_bytes(b"\x89PNG")  # a picture is read when named: this one is cut short
    assert "corrupt PNG" in str(_err(tmp_path / "x.png"))
    (tmp_path / "zero.tif").write_bytes(b"")
    assert "empty" in str(_err(tmp_path / "zero.tif"))


def test_error_truncated_tiff(tmp_path, img, stack):
    good = write_tiff(tmp_path / "good.tif", np.tile(img, (4, 4)))
    raw = good.read_bytes()
    (tmp_path / "half.tif").write_bytes(raw[: len(raw) // 2])
    assert "truncated" in str(_err(tmp_path / "half.tif"))
    good_s = write_tiff(tmp_path / "good_s.tif", stack)
    raw = good_s.read_bytes()
    (tmp_path / "half_s.tif").write_bytes(raw[: len(raw) // 2])
    _err(tmp_path / "half_s.tif")
    (tmp_path / "head.tif").write_bytes(raw[:6])
    _err(tmp_path / "head.tif")


def test_error_text_file_renamed_tif(tmp_path):
    (tmp_path / "notes.tif").write_text("these are my notes, not an image\n" * 20)
    assert "TIFF" in str(_err(tmp_path / "notes.tif"))


def test_error_bad_npy_and_npz(tmp_path, img):
    (tmp_path / "t.npy").write_text("plain text")
    e = str(_err(tmp_path / "t.npy"))
    assert "not a .npy file" in e and "pickle" not in e  # numpy's advice to unpickle a broken file: not passed on
    np.save(tmp_path / "g.npy", img)
    raw = (tmp_path / "g.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[: len(raw) // 2])
    _err(tmp_path / "cut.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _err(tmp_path / "obj.npy")
    (tmp_path / "z.npz").write_text("not a zip")
    _err(tmp_path / "z.npz")


@pytest.mark.parametrize("name,data,words", [
    ("one_d.npy", np.zeros(100), "1-D"),
    ("four_d.npy", np.zeros((2, 3, 32, 32)), "4-D"),
    ("empty.npy", np.zeros((0, 32)), "empty"),
    ("tiny.npy", np.zeros((8, 64)), "too small"),
    # [y, x, channels] is not a series of strips: said so, not read as 64 frames 64 x 16 (or 2) px wide
    ("spectrum.npy", np.zeros((64, 64, 16)), "reads as [y, x, channels] (64 x 64 px, 16 channels"),
    ("detectors.npy", np.zeros((64, 64, 2)), "reads as [y, x, channels] (64 x 64 px, 2 channels"),
    ("allnan.npy", np.full((32, 32), np.nan), "all values"),
    ("cplx.npy", np.zeros((32, 32), complex), "complex"),
])
def test_error_bad_content(tmp_path, name, data, words):
    np.save(tmp_path / name, data)
    assert words in str(_err(tmp_path / name))


def test_frames_much_narrower_than_tall_are_read_and_said(tmp_path):
    """An array without axis names is [frames, H, W]; one whose frames are 4x taller than wide and 4x
    more than their width (a last axis too long to be refused as channels) is read so, and the reader
    says it may be [y, x, frames] saved frames-last, in a warning and in the input's notes."""
    data = np.random.default_rng(0).random((264, 260, 65), np.float32)  # 65 > 64, 4 * 65 <= 260
    np.save(tmp_path / "yxt.npy", data)
    with pytest.warns(ReadWarning, match=r"read as 264 frames of 260 x 65 px.*numpy.moveaxis"):
        mg = read(tmp_path / "yxt.npy")
    assert mg.data.shape == (264, 260, 65) and mg.metadata["narrow_frames"] == [264, 260, 65]
    from stemfast.batch.inputs import describe_input

    assert any(n.startswith("the array [264, 260, 65] was read as 264 frames") for n in describe_input(mg)["notes"])
    # frames as tall as wide, or a channels-last array (refused, above), say nothing of the kind
    np.save(tmp_path / "series.npy", np.zeros((80, 40, 40), np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReadWarning)
        assert "narrow_frames" not in read(tmp_path / "series.npy").metadata


def test_nonfinite_pixels(tmp_path, img):
    bad = img.copy()
    bad[3, 4] = np.nan
    bad[10, 11] = np.inf
    bad[20, 2] = -np.inf
    np.save(tmp_path / "nan.npy", bad)
    e = _err(tmp_path / "nan.npy")
    assert "3 of" in str(e) and "allow_nonfinite" in str(e)
    with pytest.warns(ReadWarning, match="3"):
        mg = read(tmp_path / "nan.npy", allow_nonfinite=True)
    assert np.isfinite(mg.data).all()
    med = np.median(img[np.isfinite(bad)])
    assert mg.data[3, 4] == pytest.approx(med) and mg.data[20, 2] == pytest.approx(med)
    good = np.isfinite(bad)
    np.testing.assert_array_equal(mg.data[good], img[good])
    # in a memory-mapped stack too (the file is not modified)
    st = np.stack([img, bad, img]).astype(np.float32)
    np.save(tmp_path / "nan_s.npy", st)
    _err(tmp_path / "nan_s.npy")
    with pytest.warns(ReadWarning):
        ms = read(tmp_path / "nan_s.npy", allow_nonfinite=True)
    assert np.isfinite(ms.data).all()
    assert np.isnan(np.load(tmp_path / "nan_s.npy")[1, 3, 4])


def test_nonfinite_in_tiff(tmp_path, img):
    bad = img.copy()
    bad[0, 0] = np.nan
    p = write_tiff(tmp_path / "n.tif", bad)
    assert "1 of" in str(_err(p))


def test_dataset_only_for_hdf5(tmp_path, img):
    p = write_tiff(tmp_path / "a.tif", img)
    _err(p, dataset="x")


def test_frames_on_single_image(tmp_path, img):
    p = write_tiff(tmp_path / "a.tif", img)
    np.testing.assert_array_equal(read(p, frames=0).data, img)
    _err(p, frames=1)


# ---------------------------------------------------------------------------------------------
# folder listing, Micrograph, units
# ---------------------------------------------------------------------------------------------
def test_find_micrographs(tmp_path, img):
    sub = tmp_path / "sub"
    hidden = tmp_path / ".cache"
    sub.mkdir()
    hidden.mkdir()
    write_tiff(tmp_path / "b.tif", img)
    write_tiff(sub / "c.TIFF", img)
    np.save(tmp_path / "a.npy", img)
    np.savez(tmp_path / "a.truth.npz", truth=np.zeros((1, 4)), meta="{}")
    np.save(tmp_path / ".hidden.npy", img)
    np.save(hidden / "h.npy", img)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "figure.png").write_bytes(b"x")  # a picture: read when named, never picked from a folder
    (tmp_path / "run.emi").write_bytes(b"x")
    (tmp_path / "run_1.ser").write_bytes(b"x")
    (tmp_path / "lone.emi").write_bytes(b"x")
    (tmp_path / "dir.tif").mkdir()
    found = find_micrographs(tmp_path)
    rel = [p.relative_to(tmp_path).as_posix() for p in found]
    assert rel == ["a.npy", "b.tif", "lone.emi", "run_1.ser", "sub/c.TIFF"]
    flat = [p.name for p in find_micrographs(tmp_path, recursive=False)]
    assert flat == ["a.npy", "b.tif", "lone.emi", "run_1.ser"]
    with pytest.raises(ReadError):
        find_micrographs(tmp_path / "nope")
    assert all(e.startswith(".") and e == e.lower() for e in SUPPORTED_EXTENSIONS)


def test_micrograph_properties():
    mg = Micrograph(np.zeros((32, 40), np.float32), pixel_size=2.0, unit="A")
    assert mg.shape2d == (32, 40) and mg.n_frames == 1 and not mg.is_stack
    assert mg.pixel_size_nm == pytest.approx(0.2)
    assert mg.frame(-1).shape == (32, 40)
    with pytest.raises(IndexError):
        mg.frame(1)
    with pytest.raises(Exception):
        mg.pixel_size = 3.0  # frozen
    assert "uncalibrated" in repr(Micrograph(np.zeros((16, 16), np.float32)))


def test_unit_to_nm():
    assert unit_to_nm("nm") == 1.0 and unit_to_nm("Å") == 0.1 and unit_to_nm("µm") == 1000.0
    assert unit_to_nm("pm") == 0.001 and unit_to_nm("1/nm") is None and unit_to_nm(None) is None


def test_written_files_get_the_usual_permissions(tmp_path, img):
    """Atomic writes go through a mkstemp file (mode 0600): the result must get 0666 & ~umask."""
    import torch  # noqa: F401 - the model file is written by torch.save

    from stemfast.atomic import write_text
    from stemfast.model import RVAE, RVAEConfig
    from stemfast.model.training import build_network

    old = os.umask(0o022)
    try:
        t = write_tiff(tmp_path / "a.tif", img)
        j = tmp_path / "b.json"
        write_text(j, "{}")
        cfg = RVAEConfig(input_size=16, channels=(4, 4, 4), stn_channels=(4, 4), device="cpu")
        m = RVAE(build_network(cfg), cfg).save(tmp_path / "m.pt")
    finally:
        os.umask(old)
    for p in (t, j, m):
        assert (p.stat().st_mode & 0o777) == 0o644, (p.name, oct(p.stat().st_mode))


def _rss_file_kib() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssFile:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


@pytest.mark.skipif(_rss_file_kib() is None, reason="needs Linux /proc/self/status (RssFile)")
def test_streaming_a_memory_mapped_stack_keeps_resident_memory_flat(tmp_path):
    """Reading (which checks every frame) and iterating a memory-mapped stack must not leave the
    file's pages resident: otherwise a 3 GB series shows as a 3 GB process (issue 5)."""
    rng = np.random.default_rng(2)
    stack = rng.normal(size=(48, 384, 384)).astype(np.float32)  # 27 MiB
    p = write_tiff(tmp_path / "s.tif", stack)
    del stack
    before = _rss_file_kib()
    mg = read(p)
    assert isinstance(mg.data, np.memmap)
    total = 0.0
    for f in mg.frames():
        total += float(f[0, 0])
    grown = _rss_file_kib() - before
    assert grown < 0.25 * p.stat().st_size / 1024, f"{grown} KiB of the {p.stat().st_size // 1024} KiB file resident"
    np.testing.assert_array_equal(mg.frame(5), read(p, frames=5).data)


def _stack_of(dtype, n_frames: int, side: int = 128) -> np.ndarray:
    """A [n_frames, side, side] stack of detector counts in ``dtype`` (a float's with a fraction)."""
    rng = np.random.default_rng(7)
    a = rng.poisson(100, size=(n_frames, side, side)).astype(np.float64)
    return (a + 0.25).astype(dtype) if np.dtype(dtype).kind == "f" else a.astype(dtype)


def _read_and_stream(p) -> tuple[Micrograph, list[np.ndarray], int]:
    """``read(p)``, its frames, and the peak of the NumPy memory allocated meanwhile (tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        mg = read(p)
        frames = []
        for i, f in enumerate(mg.frames()):
            frames.append(f[::16, ::16].copy())  # a sample of each: the frames themselves are not kept
            assert f.dtype == np.float32 and f.shape == mg.shape2d, i
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return mg, frames, peak


@pytest.mark.parametrize("fmt", ["npy", "tif"])
@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8, np.int32, np.float64, np.float16,
                                   np.dtype(">u2"), np.dtype(">f4"), np.dtype(">f8")])
def test_a_stack_of_any_number_type_is_memory_mapped_and_read_in_constant_memory(tmp_path, fmt, dtype):
    """A detector's uint16 stack (or int32, float64, ..., and big-endian files of any type) is kept as the
    file's memory map and converted to float32 one frame at a time, as a float32 stack is: the memory
    read() and the frames take does not grow with the number of frames, and the frames are those of the
    whole stack converted at once (.npz, read into memory). Before: every stack not float32 was converted
    whole, 300 x 512^2 uint16 peaking at 561 MiB against 40 MiB for the same data in float32; a big-endian
    one was still, after that (its TIFF written by tifffile with byteorder '>', its .npy with a '>' type)."""
    frame_bytes = 4 * 128 * 128
    peaks = {}
    for n in (6, 24):
        data = _stack_of(dtype, n)
        p = tmp_path / f"s{n}.{fmt}"
        if fmt == "npy":
            np.save(p, data)
        else:
            tifffile.imwrite(p, data, byteorder=">" if data.dtype.byteorder == ">" else None)
        np.savez(tmp_path / f"s{n}.npz", image=data)
        mg, frames, peaks[n] = _read_and_stream(p)
        assert isinstance(mg.data, np.memmap) and mg.data.dtype == dtype and mg.n_frames == n
        whole = read(tmp_path / f"s{n}.npz")
        assert whole.data.dtype == np.float32 and not isinstance(whole.data, np.memmap)
        np.testing.assert_array_equal(np.stack(frames), whole.data[:, ::16, ::16])
        np.testing.assert_array_equal(mg.frame(n - 1), whole.data[n - 1])
        assert mg.metadata.get("rescaled") is None and whole.metadata.get("rescaled") is None
    assert peaks[24] < 4 * frame_bytes, peaks  # 24 float32 frames are 6 * 4
    assert peaks[24] - peaks[6] < frame_bytes, peaks


def test_a_memory_mapped_integer_stack_is_charged_one_frame_by_the_memory_check(tmp_path, monkeypatch):
    """The memory check charges what a memory-mapped stack holds (a frame at a time), whatever its type:
    a 32 x 256^2 uint16 stack needs about 12 MiB whole and is read with 4 MiB (refused before); one whose
    values float32 cannot carry (int64 scaled by 1e12: rescaled into a float32 copy of the whole) is
    charged the whole stack and refused."""
    data = _stack_of(np.uint16, 32, side=256)
    np.save(tmp_path / "u16.npy", data)
    np.save(tmp_path / "huge.npy", data.astype(np.int64) * 10**12)
    monkeypatch.setenv("STEMFAST_MEMORY_LIMIT_MB", "4")
    mg = read(tmp_path / "u16.npy")
    assert isinstance(mg.data, np.memmap) and mg.data.dtype == np.uint16
    np.testing.assert_array_equal(mg.frame(31), data[31].astype(np.float32))
    assert "256 x 256 px x 32 frames (int64)" in str(_err(tmp_path / "huge.npy"))
    monkeypatch.delenv("STEMFAST_MEMORY_LIMIT_MB")
    with pytest.warns(ReadWarning, match="rescaled"):
        big = read(tmp_path / "huge.npy")
    assert big.data.dtype == np.float32 and not isinstance(big.data, np.memmap)
    assert big.metadata["rescaled"]["offset"] == float(int(data.min()) * 10**12)
    part = read(tmp_path / "huge.npy", frames=slice(4, 6), rescale=big.metadata["rescaled"])
    np.testing.assert_array_equal(part.data, big.data[4:6])


def test_a_float64_stack_with_nan_padding_is_filled_as_before(tmp_path):
    """A memory-mapped float64 stack with an aligned frame's NaN padding and a value beyond float32's range
    (infinite as float32): counted and filled as float32 holds them, as the stack read into memory is."""
    data = _stack_of(np.float64, 4)
    data[2, :, :16] = np.nan  # an aligned frame's padding: filled whatever the options
    np.save(tmp_path / "pad.npy", data)
    np.savez(tmp_path / "pad.npz", image=data)
    with pytest.warns(ReadWarning, match="NaN"):
        mg = read(tmp_path / "pad.npy")
    with pytest.warns(ReadWarning, match="NaN"):
        ref = read(tmp_path / "pad.npz")
    assert mg.metadata["nonfinite_replaced"] == ref.metadata["nonfinite_replaced"] == 128 * 16
    np.testing.assert_array_equal(mg.data, ref.data)
    data[1, 5, 5] = 1e300  # inf as float32: a scattered non-finite value
    np.save(tmp_path / "over.npy", data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's overflow in the cast
        e = _err(tmp_path / "over.npy", rescale=False)
    assert f"{128 * 16 + 1} of {4 * 128 * 128} values are NaN or infinite" in str(e)


# ----------------------------------------------------------------------------- limits: memory, range, non-finite


def test_declared_size_beyond_memory_is_refused_before_loading(tmp_path, monkeypatch):
    """A sparse TIFF declaring 100000 x 100000 px: a ReadError naming the size, in milliseconds."""
    import time

    from stemfast.io import available_memory_bytes

    assert available_memory_bytes() > 0
    tifffile.imwrite(tmp_path / "huge.tif", shape=(100000, 100000), dtype="uint8", bigtiff=True)
    monkeypatch.setenv("STEMFAST_MEMORY_LIMIT_MB", "4096")  # the same answer on any machine
    t0 = time.monotonic()
    e = _err(tmp_path / "huge.tif")
    assert time.monotonic() - t0 < 5
    assert "100000 x 100000 px (uint8)" in str(e) and "4.0 GiB available" in str(e)
    # the same check guards .npy files (memory-mapped until converted)
    np.lib.format.open_memmap(tmp_path / "huge.npy", mode="w+", dtype=np.float32, shape=(40000, 40000))
    assert "40000 x 40000 px (float32)" in str(_err(tmp_path / "huge.npy"))


GIB = 2**30


def _fake_system(root, cgroup_line: str, files: dict[str, str], *, vm_size_kib: int = 0):
    """A fake ``/proc`` (64 GiB MemAvailable, no swap; ``cgroup_line`` in self/cgroup) and cgroup mount
    (``files``: path under it -> text), under ``root``: ``(proc, cgroup_root)``."""
    proc, cg = root / "proc", root / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: {128 * 2**20} kB\nMemAvailable: {64 * 2**20} kB\nSwapFree: 0 kB\n")
    (proc / "self" / "cgroup").write_text(cgroup_line + "\n")
    (proc / "self" / "status").write_text(f"Name: python\nVmSize: {vm_size_kib} kB\n")
    for rel, text in files.items():
        (cg / rel).parent.mkdir(parents=True, exist_ok=True)
        (cg / rel).write_text(text)
    return proc, cg


def test_the_memory_check_heeds_the_cgroup_limit(tmp_path, monkeypatch):
    """In a container (docker --memory) or a SLURM job, /proc/meminfo shows the host's free memory: an
    image the job's cgroup cannot hold was accepted, and the job killed. The memory available is the least
    of the host's and the room under the limit of the process's cgroup and those above it (v2: memory.max -
    memory.current, v1: memory.limit_in_bytes - memory.usage_in_bytes, the reclaimable page cache counted
    as room); 'max' or v1's 2^63 is no limit."""
    from stemfast import readbase

    monkeypatch.delenv("STEMFAST_MEMORY_LIMIT_MB", raising=False)
    proc, cg = _fake_system(tmp_path / "v2", "0::/job/step", {
        "job/memory.max": str(2 * GIB), "job/memory.current": "0", "job/memory.stat": "anon 0\ninactive_file 0\n",
        "job/step/memory.max": "max", "job/step/memory.current": str(GIB)})
    assert readbase.available_memory_bytes(proc=proc, cgroup_root=cg) == 2 * GIB
    monkeypatch.setattr(readbase, "PROC_ROOT", str(proc))
    monkeypatch.setattr(readbase, "CGROUP_ROOT", str(cg))
    with pytest.raises(ReadError, match=r"20000 x 20000 px \(float32\) needs about [0-9.]+ GiB to analyse, 2\.0 GiB "
                                        "available"):  # 1.5 GiB a frame, its copy and working copies
        readbase._check_memory(tmp_path / "big.tif", (20000, 20000), np.float32)
    (cg / "job" / "memory.max").write_text("max\n")
    assert readbase.available_memory_bytes() == 64 * GIB  # no limit: the host's
    readbase._check_memory(tmp_path / "big.tif", (20000, 20000), np.float32)
    (cg / "job" / "step" / "memory.max").write_text(str(3 * GIB))  # the step's own limit, 1 GiB of it used
    (cg / "job" / "step" / "memory.stat").write_text(f"inactive_file {GIB // 2}\n")  # half of it page cache
    assert readbase.available_memory_bytes() == 3 * GIB - GIB + GIB // 2
    # cgroup v1, the container's own cgroup mounted at memory/ (the host's path is not there)
    proc, cg = _fake_system(tmp_path / "v1", "4:memory:/docker/0123abcd\n3:cpu,cpuacct:/docker/0123abcd", {
        "memory/memory.limit_in_bytes": str(GIB), "memory/memory.usage_in_bytes": str(GIB - GIB // 4),
        "memory/memory.stat": f"cache 1\ntotal_inactive_file {GIB // 8}\n"})
    assert readbase.available_memory_bytes(proc=proc, cgroup_root=cg) == GIB // 4 + GIB // 8
    (cg / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert readbase.available_memory_bytes(proc=proc, cgroup_root=cg) == 64 * GIB
    monkeypatch.setenv("STEMFAST_MEMORY_LIMIT_MB", "100")  # the user's word comes first
    assert readbase.available_memory_bytes(proc=proc, cgroup_root=cg) == 100 * 2**20


def test_the_memory_check_heeds_the_address_space_limit(tmp_path, monkeypatch):
    """``ulimit -v`` (RLIMIT_AS): the room is the limit less the process's virtual size; no limit, none."""
    import resource

    from stemfast import readbase

    monkeypatch.delenv("STEMFAST_MEMORY_LIMIT_MB", raising=False)
    proc, cg = _fake_system(tmp_path, "0::/", {}, vm_size_kib=2**20)  # 1 GiB mapped already
    real = resource.getrlimit
    monkeypatch.setattr(resource, "getrlimit", lambda what: (3 * GIB, resource.RLIM_INFINITY)
                        if what == resource.RLIMIT_AS else real(what))
    assert readbase.available_memory_bytes(proc=proc, cgroup_root=cg) == 2 * GIB
    monkeypatch.setattr(resource, "getrlimit", lambda what: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert readbase.available_memory_bytes(proc=proc, cgroup_root=cg) == 64 * GIB


def test_the_memory_check_covers_what_the_site_search_holds(tmp_path, monkeypatch):
    """The read-time estimate for a float32 image is above the image plus what find_sites holds at its
    peak (tracemalloc: 5.5 frames at 2048 x 2048): with only that much memory the image is refused at
    once, not accepted and killed in the analysis (the estimate was 4 frames; a 16k float32 image
    estimated at 4 GiB peaked at 8.5 GiB)."""
    import tracemalloc

    from stemfast.sites import find_sites
    from stemfast.synthetic import make_mos2

    img = np.asarray(make_mos2(shape=(2048, 2048), seed=5).image, np.float32)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            find_sites(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    tifffile.imwrite(tmp_path / "a.tif", img)
    monkeypatch.setattr("stemfast.readbase.available_memory_bytes", lambda: img.nbytes + peak)
    assert "2048 x 2048 px (float32)" in str(_err(tmp_path / "a.tif"))


def test_huge_pixel_values_are_rescaled_safely_and_give_the_same_sites(tmp_path):
    """An int64 image scaled by 1e16 used to give spacing 29 px instead of 16.7 and a third of the sites."""
    from stemfast.sites import find_sites
    from stemfast.synthetic import make_mos2

    s = make_mos2(shape=(192, 192), seed=3)
    base = np.round(s.image / s.image.max() * 500).astype(np.int64)
    np.save(tmp_path / "plain.npy", base)
    np.save(tmp_path / "huge.npy", base * 10**16)
    np.save(tmp_path / "offset.npy", base + 10**12)  # a large offset: float32 would keep no signal
    plain = read(tmp_path / "plain.npy")
    ref = find_sites(plain.data)
    assert "rescaled" not in plain.metadata
    for name in ("huge.npy", "offset.npy"):
        with pytest.warns(ReadWarning, match="rescaled"):
            mg = read(tmp_path / name)
        assert mg.data.dtype == np.float32 and float(mg.data.min()) == 0.0 and float(mg.data.max()) == 1.0
        assert mg.metadata["rescaled"]["scale"] > 0
        t = find_sites(mg.data)
        assert len(t) == len(ref), name
        assert t.meta["spacing_px"] == pytest.approx(ref.meta["spacing_px"], abs=1e-3), name
        np.testing.assert_allclose(np.sort(t.xy[:, 0]), np.sort(ref.xy[:, 0]), atol=1e-3)


def test_fill_nonfinite_has_a_limit(tmp_path, img):
    bad = img.copy()
    bad[:5] = np.nan  # 12.5 % of the pixels
    np.save(tmp_path / "many.npy", bad)
    e = _err(tmp_path / "many.npy")
    assert "--fill-nonfinite" in str(e)
    with pytest.raises(ReadError, match=r"12.50% of the pixels are NaN or infinite outside regions without data, "
                                        r"more than the 1.00%"):
        read(tmp_path / "many.npy", allow_nonfinite=True, max_nonfinite_fraction=0.01)
    with pytest.warns(ReadWarning):
        mg = read(tmp_path / "many.npy", allow_nonfinite=True, max_nonfinite_fraction=0.2)
    assert np.isfinite(mg.data).all()


def test_a_nan_margin_is_filled_as_a_region_without_data(tmp_path):
    """An aligned frame padded with NaN: the margin is no scattered damage, so the limit on filled
    pixels does not count it; filled, it is one value, a region without data where no site goes."""
    from stemfast.sites import find_sites
    from stemfast.synthetic import make_mos2

    img = make_mos2(shape=(256, 256), seed=4).image.astype(np.float32)
    pad = np.full_like(img, np.nan)
    pad[24:, 40:] = img[:-24, :-40]
    pad[100, 100] = np.nan  # and one scattered pixel
    np.save(tmp_path / "aligned.npy", pad)
    e = _err(tmp_path / "aligned.npy")
    assert "form regions without data" in str(e)
    with pytest.warns(ReadWarning, match="replaced"):
        mg = read(tmp_path / "aligned.npy", allow_nonfinite=True, max_nonfinite_fraction=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = find_sites(mg.data)
    assert t.meta["lattice"]["no_data"]["share"] == pytest.approx(1 - 232 * 216 / 256 ** 2, abs=1e-3)
    assert not ((t.xy[:, 0] < 40 - 0.5 * t.meta["spacing_px"]) | (t.xy[:, 1] < 24 - 0.5 * t.meta["spacing_px"])).any()


def test_a_nan_margin_alone_is_filled_without_being_asked(tmp_path):
    """An aligned (drift-corrected) frame whose only NaN pixels are its padding, alone and in a stack:
    read as it is, with a warning that says so; its margin becomes a region without data. One
    scattered NaN more, and the reader refuses as before (test above)."""
    from stemfast.synthetic import make_mos2

    img = make_mos2(shape=(128, 128), seed=5).image.astype(np.float32)
    pad = np.full_like(img, np.nan)
    pad[16:, :-24] = img[:-16, 24:]
    np.save(tmp_path / "aligned.npy", pad)
    np.save(tmp_path / "stack.npy", np.stack([pad, pad]))
    for name in ("aligned.npy", "stack.npy"):
        with pytest.warns(ReadWarning, match="all in regions without data"):
            mg = read(tmp_path / name)
        data = np.asarray(mg.data)
        assert np.isfinite(data).all() and mg.metadata["nonfinite_in_regions"]
        assert mg.metadata["nonfinite_replaced"] == int(np.isnan(pad).sum()) * (1 + (name == "stack.npy"))
        frame = data if data.ndim == 2 else data[1]
        np.testing.assert_array_equal(frame[16:, :-24], img[:-16, 24:])
        assert len(np.unique(frame[:16])) == 1 and len(np.unique(frame[:, -24:])) == 1


def test_scan_lists_dangling_links_and_unreadable_folders(tmp_path, img, monkeypatch):
    import stemfast.io as io

    np.save(tmp_path / "a.npy", img)
    (tmp_path / "sub").mkdir()
    np.save(tmp_path / "sub" / "b.npy", img)
    os.symlink(tmp_path / "nowhere.tif", tmp_path / "lost.tif")
    os.symlink(tmp_path / "nowhere.txt", tmp_path / "lost.txt")  # not a micrograph name: not listed
    files, problems = io.scan_micrographs(tmp_path)
    assert [p.name for p in files] == ["a.npy", "b.npy"]
    assert [(p.name, r.split(" (")[0]) for p, r in problems] == [("lost.tif", "dangling symbolic link")]
    real = io._scandir

    def scandir(path):
        if os.path.basename(path) == "sub":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(io, "_scandir", scandir)
    files, problems = io.scan_micrographs(tmp_path)
    assert [p.name for p in files] == ["a.npy"]
    assert ("sub", "folder not readable (permission denied); its files are not analysed") in \
        [(p.name, r) for p, r in problems]
    assert [p.name for p in find_micrographs(tmp_path)] == ["a.npy"]  # the old API: files only (problems logged)


def test_a_sidecar_json_gives_the_pixel_size_where_the_file_has_none(tmp_path, img):
    """The shared MoS2 arrays come with their authors' JSON beside them (field of view, material):
    ``x.npy`` + ``x.json``. Its field of view over the width, or a pixel size and its unit, calibrate
    an array without one; a file's own calibration comes first; a sidecar that is no JSON object
    calibrates nothing and is said."""
    from stemfast.io import sidecar

    np.save(tmp_path / "a.npy", img)
    (tmp_path / "a.json").write_text(json.dumps({"material_type": "1% V-doped MoS2 monolayer", "experimental_details": {
        "spatial_info": {"field_of_view_x": 9.0, "field_of_view_y": 9.0, "field_of_view_units": "nm"}}}))
    mg = read(tmp_path / "a.npy")
    assert mg.pixel_size == pytest.approx(9.0 / img.shape[1]) and mg.unit == "nm"
    side = mg.metadata["sidecar"]
    assert side["used"] and side["material"] == "mos2" and side["file"] == "a.json"
    np.save(tmp_path / "b.npy", img)
    (tmp_path / "b.json").write_text(json.dumps({"pixel_size": 0.2, "unit": "Å", "sample": "WSe2 with Ti"}))
    mg = read(tmp_path / "b.npy")
    assert mg.pixel_size_nm == pytest.approx(0.02) and mg.metadata["sidecar"]["material"] == "wse2"
    write_tiff(tmp_path / "c.tif", img, pixel_size=0.05)
    (tmp_path / "c.json").write_text(json.dumps({"pixel_size_nm": 0.9}))
    mg = read(tmp_path / "c.tif")
    assert mg.pixel_size == pytest.approx(0.05) and not mg.metadata["sidecar"].get("used")
    np.save(tmp_path / "d.npy", img)
    (tmp_path / "d.json").write_text("[1, 2")
    mg = read(tmp_path / "d.npy")
    assert mg.pixel_size is None and "not read" in mg.metadata["sidecar"]["error"]
    assert sidecar(tmp_path / "e.npy", 64) == {}  # none beside it
    # a formula is a whole word: "MoS2-like" names MoS2, "WSe2x" nothing
    (tmp_path / "f.json").write_text(json.dumps({"material": "WSe2x"}))
    assert "material" not in sidecar(tmp_path / "f.npy", 64)


def test_a_sidecar_naming_another_material_is_said_in_the_summary(tmp_path, monkeypatch):
    """Analysed as MoS2 (the default) while the sidecar says WSe2: the summary's notes say so and name
    the setting; the calibration it gives is used (x_nm in the table)."""
    from stemfast.batch import run_batch
    from stemfast.synthetic import make_mos2

    monkeypatch.setenv("STEMFAST_ENCODE_WORKER", "0")
    im = make_mos2(shape=(160, 160), seed=3, pixel_size_A=0.2, dose=50.0).image
    np.save(tmp_path / "w.npy", np.asarray(im, np.float32))
    (tmp_path / "w.json").write_text(json.dumps({"material_type": "Ti-doped WSe2 monolayer",
                                                 "field_of_view_x": 3.2, "field_of_view_units": "nm"}))
    out = tmp_path / "out"
    rep = run_batch(tmp_path / "w.npy", out, show_progress=False)
    assert rep.by_name("w").status == "done"
    s = json.loads((out / "w" / "summary.json").read_text())
    notes = s["input"]["notes"]
    assert any("pixel size from the sidecar w.json" in n for n in notes)
    assert any("'Ti-doped WSe2 monolayer'" in n and "--material wse2" in n for n in notes), notes
    assert "x_nm" in (out / "w" / "sites.csv").read_text().splitlines()[0]
    # the classes taken from the sites' own sublattice around them are counted in the input's summary
    assert isinstance(s["classes_from_neighbours"], int) and "classes_from_neighbours" in s["frames"][0]


def test_a_sidecar_field_of_view_with_a_plain_unit_key():
    """``field_of_view_x`` with its unit under a plain ``units`` key (as the README words it: "and its
    units") gives the pixel size, as ``pixel_size`` with ``unit`` does; it was read as no calibration."""
    import pathlib
    import tempfile

    from stemfast.sidecar import sidecar

    d = pathlib.Path(tempfile.mkdtemp())
    (d / "a.json").write_text(json.dumps({"field_of_view_x": 4.0, "units": "nm"}))
    s = sidecar(d / "a.npy", 400)
    assert s["pixel_size"] == pytest.approx(0.01) and s["unit"] == "nm"


def test_a_large_exported_picture_is_read_not_taken_for_a_decompression_bomb(tmp_path, monkeypatch):
    """Pillow refuses pictures over twice its pixel limit as "decompression bombs" -- a 16k x 16k
    micrograph's export is one, and was reported as an unreadable or corrupt file. The reader's own
    memory check decides instead (here with Pillow's limit lowered to stand for a large picture), and
    Pillow's limit is left as it was."""
    from PIL import Image

    a = (np.random.default_rng(0).random((120, 100)) * 255).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 12,000 px > 2 x 1000: a "bomb" to Pillow
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", ReadWarning)
        mg = read(tmp_path / "big.png")
    assert mg.data.shape == (120, 100) and np.array_equal(mg.data, a)
    assert Image.MAX_IMAGE_PIXELS == 1000
    monkeypatch.setattr("stemfast.readbase.available_memory_bytes", lambda: 10_000)  # _check_memory's module
    with pytest.raises(ReadError, match="image too large for the memory: 120 x 100 px"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ReadWarning)
            read(tmp_path / "big.png")


def test_a_diffraction_patterns_calibration_is_not_taken_for_a_pixel_size(tmp_path, img):
    """RosettaSciIO gives a TIA diffraction pattern's reciprocal calibration in "nm" (1e16-1e17 per
    pixel); a calibration outside PLAUSIBLE_PIXEL_NM is no micrograph's: not used, said (a
    ReadWarning, metadata, the batch's input notes). One inside is kept."""
    pytest.importorskip("rsciio.tia")
    from serfile import write_ser

    from stemfast.batch.inputs import describe_input
    from stemfast.io import PLAUSIBLE_PIXEL_NM, ReadWarning

    p = write_ser(tmp_path / "dp.ser", img, pixel_size_m=4.2e7)
    with pytest.warns(ReadWarning, match="no micrograph's"):
        mg = read(p)
    assert mg.pixel_size is None and mg.pixel_size_nm is None
    assert mg.metadata["calibration_ignored"]["pixel_size_nm"] == pytest.approx(4.2e16)
    assert any("not used" in n for n in describe_input(mg)["notes"])
    for nm in PLAUSIBLE_PIXEL_NM:  # the bounds themselves are micrographs' (a navigation camera's 0.26 mm)
        assert read(write_ser(tmp_path / "ok.ser", img, pixel_size_m=nm * 1e-9)).pixel_size == pytest.approx(nm)


@pytest.mark.parametrize("parser", ["rsciio's own parser", "its public reader"])
def test_a_tiff_with_digitalmicrograph_calibration_tags_is_calibrated(tmp_path, img, parser, monkeypatch):
    """A TIFF saved by DigitalMicrograph carries its calibration in Gatan's private tags (65003 / 65004
    units, 65009 / 65010 scales), which tifffile leaves to the caller: read through RosettaSciIO's TIFF
    reader when the TIFF has no calibration of its own; not where an image axis is not a length. Its
    parser of the tags is called on a file opened and closed here (no file left open, no dask imported);
    where a RosettaSciIO version lacks it, its public (lazy) reader gives the same."""
    pytest.importorskip("rsciio.tiff")
    import gc

    import tifffile

    if parser == "its public reader":  # a version whose parser takes other arguments
        from rsciio.tiff import _api

        original = _api._parse_scale_unit
        monkeypatch.setattr(_api, "_parse_scale_unit", lambda *args: original(*args))
        from stemfast.tiff import _rsciio_axes

        assert _rsciio_axes(str(tmp_path / "none.tif")) is None  # its signature is unknown: the public reader

    def dm_tiff(name, units):
        tags = [(65003, "s", 0, units[0], False), (65004, "s", 0, units[1], False),
                (65009, "d", 1, 0.0165, False), (65010, "d", 1, 0.0165, False)]
        tifffile.imwrite(tmp_path / name, img, extratags=tags)
        return tmp_path / name

    mg = read(dm_tiff("dm.tif", ("nm", "nm")))
    assert mg.pixel_size == pytest.approx(0.0165) and mg.unit == "nm"
    assert mg.metadata["calibration_from"] == "RosettaSciIO's TIFF reader"
    assert read(dm_tiff("um.tif", ("um", "um"))).pixel_size == pytest.approx(16.5)
    assert read(dm_tiff("streak.tif", ("ps", "nm"))).pixel_size is None  # a streak camera's time axis
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, img)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ResourceWarning)
        assert read(plain).pixel_size is None
        gc.collect()
    if parser == "rsciio's own parser":
        assert not [w for w in seen if issubclass(w.category, ResourceWarning)], [str(w.message) for w in seen]


def test_a_reader_missing_an_optional_package_names_it(tmp_path, monkeypatch, img):
    """A TIFF compressed with JPEG needs imagecodecs, a Velox spectrum-image file RosettaSciIO's sparse:
    the error names the package and how to install it, not "unreadable or corrupt"."""
    from stemfast import io as sio

    p = tmp_path / "a.tif"
    sio.write_tiff(p, img)
    for exc, name in ((ValueError("<COMPRESSION.JPEG: 7> requires the 'imagecodecs' package"), "imagecodecs"),
                      (ModuleNotFoundError("The 'sparse' library was not found. To load EDS spectrum image data "
                                           "from Velox EMD files, 'sparse' must be installed."), "sparse")):
        def fail(*a, exc=exc, **k):
            raise exc

        monkeypatch.setattr(sio, "_read_tiff", fail)
        with pytest.raises(ReadError, match=f"needs the Python package '{name}'.*pip install {name}"):
            read(p)


def test_rosettasciio_signals_that_are_not_images():
    """Of a file's signals, an image is real-valued with two image axes: a line of spectra ([positions,
    channels], its first axis a navigation axis), an FFT (complex) are not; a stack's frame axis may navigate."""
    from stemfast.io import _is_image

    def sig(shape, navigate, dtype=np.float32):
        return {"data": np.zeros(shape, dtype),
                "axes": [{"index_in_array": i, "navigate": n} for i, n in enumerate(navigate)]}

    assert _is_image(sig((64, 64), (False, False)))
    assert _is_image(sig((5, 64, 64), (True, False, False)))
    assert not _is_image(sig((67, 1336), (True, False)))  # a CL spectrum line
    assert not _is_image(sig((64, 64, 2048), (True, True, False)))  # an EELS spectrum image
    assert not _is_image(sig((70, 36), (False, False), np.complex64))  # a Velox half FFT
    assert not _is_image(sig((8, 64), (False, False)))  # too small


def _ndata(path, arr, props, compression=None):
    """A Nion Swift ``.ndata`` data item: a zip of data.npy and metadata.json (stored, as Nion writes)."""
    import io as _bio
    import zipfile

    buf = _bio.BytesIO()
    np.save(buf, arr)
    with zipfile.ZipFile(path, "w", compression=compression or zipfile.ZIP_STORED) as z:
        z.writestr("data.npy", buf.getvalue())
        z.writestr("metadata.json", json.dumps(props))
    return path


def _nion_props(ndim=2, **kw):
    cal = [{"offset": 0.0, "scale": 0.0125, "units": "nm"}] * 2
    return {"type": "data-item", "title": "HAADF", "is_sequence": ndim == 3, "collection_dimension_count": 0,
            "datum_dimension_count": 2, "intensity_calibration": {"offset": 0.0, "scale": 1.0, "units": ""},
            "dimensional_calibrations": [{"offset": 0.0, "scale": 1.0, "units": ""}] * (ndim - 2) + cal, **kw}


def test_nion_swift_data_items_are_read_with_their_calibration(tmp_path, img, stack):
    """Nion Swift stores a data item as .ndata (a zip of data.npy and metadata.json) or .h5 (dataset
    'data', the same JSON in its 'properties'): image and series read with the calibration and title
    of the properties (a series memory-mapped, frames read one by one); a folder search finds them."""
    import zipfile

    import h5py

    from stemfast.io import find_micrographs

    mg = read(_ndata(tmp_path / "a.ndata", img, _nion_props()))
    np.testing.assert_array_equal(mg.data, img)
    assert mg.pixel_size == pytest.approx(0.0125) and mg.unit == "nm" and mg.metadata["title"] == "HAADF"
    json.dumps(mg.metadata)
    deflated = read(_ndata(tmp_path / "c.ndata", img, _nion_props(), zipfile.ZIP_DEFLATED))
    np.testing.assert_array_equal(deflated.data, img)
    p = _ndata(tmp_path / "s.ndata", stack, _nion_props(3))
    mg = read(p)
    assert mg.n_frames == len(stack) and mg.pixel_size == pytest.approx(0.0125)
    np.testing.assert_array_equal(read(p, frames=3).data, stack[3])
    with h5py.File(tmp_path / "h.h5", "w") as f:
        f.create_dataset("data", data=img).attrs["properties"] = json.dumps(_nion_props())
    mg = read(tmp_path / "h.h5")
    assert mg.pixel_size == pytest.approx(0.0125) and mg.metadata["title"] == "HAADF"
    assert {q.name for q in find_micrographs(tmp_path)} == {"a.ndata", "c.ndata", "s.ndata", "h.h5"}


def test_nion_swift_data_items_that_are_not_images_are_refused_with_what_they_are(tmp_path, img):
    """A spectrum image, a 4-D STEM scan, a spectrum, a zip that is no data item, a file that is no zip:
    each refused with what it is; a reciprocal calibration (an FFT's 1/nm) is no pixel size."""
    cube = np.zeros((20, 20, 64), np.float32)
    for props, arr, what in ((_nion_props(collection_dimension_count=2, datum_dimension_count=1), cube,
                              "a spectrum image"),
                             (_nion_props(collection_dimension_count=2), np.zeros((8, 8, 32, 32), np.float32),
                              "a 4-D STEM scan"),
                             (_nion_props(datum_dimension_count=1), np.zeros(256, np.float32), "a 1-D data item")):
        with pytest.raises(ReadError, match=f"Nion Swift data item: {what}"):
            read(_ndata(tmp_path / "x.ndata", arr, props))
    import zipfile

    with zipfile.ZipFile(tmp_path / "z.ndata", "w") as z:
        z.writestr("other.txt", "x")
    with pytest.raises(ReadError, match="without data.npy and metadata.json"):
        read(tmp_path / "z.ndata")
    (tmp_path / "b.ndata").write_bytes(b"not a zip")
    with pytest.raises(ReadError, match="not a zip archive"):
        read(tmp_path / "b.ndata")
    fft = _nion_props(dimensional_calibrations=[{"offset": 0, "scale": 0.5, "units": "1/nm"}] * 2)
    assert read(_ndata(tmp_path / "f.ndata", img, fft)).pixel_size_nm is None


def test_lzw_compressed_tiffs_are_read_without_imagecodecs(tmp_path, monkeypatch):
    """tifffile decodes LZW (and JPEG, ...) only through the optional imagecodecs; 10 of 15 real ADF
    TIFFs of one public set are LZW-compressed. Pillow decodes them instead: 8- and 16-bit grey, a
    multi-page series (whole and frame by frame), colour; the pixels are the written ones."""
    import importlib.util

    from PIL import Image

    from stemfast import tiff  # the TIFF reader's module: _decode_tiff looks _pillow_pages up there

    decoded = []
    pillow_pages = tiff._pillow_pages
    monkeypatch.setattr(tiff, "_pillow_pages", lambda p, idx: decoded.append(p) or pillow_pages(p, idx))

    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 255, (40, 48), dtype=np.uint8)
    grey16 = rng.integers(0, 60000, (40, 48), dtype=np.uint16)
    frames = [rng.integers(0, 255, (40, 48), dtype=np.uint8) for _ in range(3)]
    Image.fromarray(grey8).save(tmp_path / "g8.tif", compression="tiff_lzw")
    Image.fromarray(grey16).save(tmp_path / "g16.tif", compression="tiff_lzw")
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(tmp_path / "s.tif", compression="tiff_lzw", save_all=True, append_images=ims[1:])
    np.testing.assert_array_equal(read(tmp_path / "g8.tif").data, grey8)
    if importlib.util.find_spec("imagecodecs") is None:  # the fallback itself was used
        assert decoded
    np.testing.assert_array_equal(read(tmp_path / "g16.tif").data, grey16)
    mg = read(tmp_path / "s.tif")
    assert mg.n_frames == 3
    np.testing.assert_array_equal(mg.data, np.stack(frames))
    np.testing.assert_array_equal(read(tmp_path / "s.tif", frames=1).data, frames[1])
    rgb = np.repeat(grey8[:, :, None], 3, axis=2)
    Image.fromarray(rgb).save(tmp_path / "c.tif", compression="tiff_lzw")
    with pytest.warns(Warning):
        np.testing.assert_array_equal(read(tmp_path / "c.tif").data, grey8)


def test_a_tiff_with_channels_reads_channel_0_not_the_channels_as_frames(tmp_path):
    """An ImageJ hyperstack with a channel axis (two detectors of one scan, CYX; or a series of them,
    TCYX) was read as a time series of its channels: channel 0 of every frame is read, said (a
    ReadWarning, metadata, the batch's input notes)."""
    from stemfast.batch.inputs import describe_input
    from stemfast.io import ReadWarning

    rng = np.random.default_rng(0)
    cyx, tcyx = rng.random((2, 40, 48), np.float32), rng.random((3, 2, 40, 48), np.float32)
    tifffile.imwrite(tmp_path / "c.tif", cyx, imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "t.tif", tcyx, imagej=True, metadata={"axes": "TCYX"})
    with pytest.warns(ReadWarning, match="2 channels"):
        mg = read(tmp_path / "c.tif")
    np.testing.assert_array_equal(mg.data, cyx[0])
    assert mg.n_frames == 1 and mg.metadata["channels"] == 2
    assert any("2 channels" in n for n in describe_input(mg)["notes"])
    with pytest.warns(ReadWarning):
        mg = read(tmp_path / "t.tif")
        one = read(tmp_path / "t.tif", frames=2)
    np.testing.assert_array_equal(mg.data, tcyx[:, 0])
    np.testing.assert_array_equal(one.data, tcyx[2, 0])
    with pytest.warns(ReadWarning, match="channel 1 was read"):  # the other channel, by name
        np.testing.assert_array_equal(read(tmp_path / "t.tif", dataset="Channel 1").data, tcyx[:, 1])
    with pytest.raises(ReadError, match="no channel 2: the TIFF holds 2"):
        read(tmp_path / "c.tif", dataset="channel 2")
    with pytest.raises(ReadError, match="names a channel"):
        read(tmp_path / "c.tif", dataset="HAADF")


def test_an_ome_tiff_is_calibrated(tmp_path):
    """OME-TIFF (Bio-Formats, Fiji's OME export) keeps the pixel size in its OME-XML header
    (PhysicalSizeX, micrometres unless PhysicalSizeXUnit says otherwise)."""
    img = np.random.default_rng(0).random((40, 48), np.float32)
    tifffile.imwrite(tmp_path / "a.ome.tif", img, ome=True, metadata={"PhysicalSizeX": 0.02, "PhysicalSizeXUnit": "nm"})
    tifffile.imwrite(tmp_path / "b.ome.tif", img, ome=True, metadata={"PhysicalSizeX": 0.0002})
    a, b = read(tmp_path / "a.ome.tif"), read(tmp_path / "b.ome.tif")
    assert (a.pixel_size, a.unit) == (pytest.approx(0.02), "nm") and (b.pixel_size, b.unit) == (pytest.approx(0.2), "nm")
    np.testing.assert_array_equal(a.data, img)


def test_a_hyperspy_file_is_read_with_its_calibration(tmp_path):
    """HyperSpy's own format (.hspy, HDF5), as a microscopist saves a signal after working on it in
    HyperSpy: read through RosettaSciIO with its axes' calibration and title."""
    pytest.importorskip("rsciio.hspy")
    from rsciio.hspy import file_writer

    img = np.random.default_rng(0).random((40, 48), np.float32)
    axes = [{"name": n, "size": img.shape[i], "scale": 0.02, "offset": 0.0, "units": "nm", "navigate": False,
             "index_in_array": i} for i, n in enumerate("yx")]
    file_writer(str(tmp_path / "a.hspy"), {
        "data": img, "axes": axes, "metadata": {"General": {"title": "HAADF"}, "Signal": {"signal_type": ""}},
        "original_metadata": {}, "attributes": {"_lazy": False}, "tmp_parameters": {}, "models": {},
        "learning_results": {}, "package_info": {"name": "stemfast-test", "version": "0"}})
    mg = read(tmp_path / "a.hspy")
    np.testing.assert_array_equal(mg.data, img)
    assert mg.pixel_size == pytest.approx(0.02) and mg.unit == "nm" and mg.metadata["title"] == "HAADF"


def test_pages_decoded_by_pillow_keep_the_series_axes(tmp_path, monkeypatch):
    """Where tifffile lacks a codec, Pillow decodes page by page: a hyperstack's pages (T x C) are put
    back in the series' shape before its channel 0 is taken (tifffile made to refuse, as without
    imagecodecs on an LZW file)."""
    from stemfast.io import ReadWarning

    stack = np.random.default_rng(1).random((3, 2, 40, 48), np.float32)
    tifffile.imwrite(tmp_path / "t.tif", stack, imagej=True, metadata={"axes": "TCYX"})

    def refuse(*a, **k):
        raise ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", refuse)
    monkeypatch.setattr(tifffile.TiffFile, "asarray", refuse)
    with pytest.warns(ReadWarning, match="2 channels"):
        mg = read(tmp_path / "t.tif")
    np.testing.assert_array_equal(mg.data, stack[:, 0])


def test_a_tiff_with_titled_channels_reads_the_dark_field_channel(tmp_path):
    """A channel TIFF whose channels are titled (ImageJ slice labels, OME-TIFF channel names) gives the
    dark-field detector's channel, as an EMD of several detectors does, whatever channel it is; any
    channel is read by its title (any case) or number; a title it does not hold is an error that lists
    them. Titles that do not tell the channels apart are not used (channel 0, as without titles)."""
    from stemfast.batch.inputs import describe_input
    from stemfast.io import ReadWarning, tiff_channel_info

    rng = np.random.default_rng(1)
    tcyx = rng.random((3, 2, 40, 48), np.float32)
    tifffile.imwrite(tmp_path / "ij.tif", tcyx, imagej=True,
                     metadata={"axes": "TCYX", "Labels": ["BF", "HAADF"] * 3})
    tifffile.imwrite(tmp_path / "ome.ome.tif", tcyx[0], ome=True,
                     metadata={"axes": "CYX", "Channel": {"Name": ["BF", "HAADF"]}})
    tifffile.imwrite(tmp_path / "same.tif", tcyx[0], imagej=True, metadata={"axes": "CYX", "Labels": ["a", "A"]})
    assert tiff_channel_info(tmp_path / "ij.tif") == (2, ["BF", "HAADF"])
    assert tiff_channel_info(tmp_path / "ome.ome.tif") == (2, ["BF", "HAADF"])
    assert tiff_channel_info(tmp_path / "same.tif") == (2, [])
    with pytest.warns(ReadWarning, match=r"2 channels \(BF, HAADF\).*channel 1 \(HAADF\) was read"):
        mg = read(tmp_path / "ij.tif")
    np.testing.assert_array_equal(mg.data, tcyx[:, 1])
    assert mg.metadata["channel_titles"] == ["BF", "HAADF"]
    assert any("channel 1 (HAADF) was read" in n for n in describe_input(mg)["notes"])
    with pytest.warns(ReadWarning):
        np.testing.assert_array_equal(read(tmp_path / "ij.tif", dataset="bf").data, tcyx[:, 0])
        np.testing.assert_array_equal(read(tmp_path / "ij.tif", dataset="channel 0", frames=2).data, tcyx[2, 0])
        np.testing.assert_array_equal(read(tmp_path / "ome.ome.tif").data, tcyx[0, 1])
        np.testing.assert_array_equal(read(tmp_path / "same.tif").data, tcyx[0, 0])
    with pytest.raises(ReadError, match="titled 'BF', 'HAADF', not 'DF2'"):
        read(tmp_path / "ij.tif", dataset="DF2")


def test_pixels_that_are_not_square_are_said_and_the_width_is_the_pixel_size(tmp_path, img, caplog, monkeypatch):
    """An ImageJ TIFF (XResolution / YResolution) or a Nion data item (its two dimensional calibrations)
    whose pixels are taller than wide: the width is the pixel size, the height is in
    ``metadata["pixel_size_y"]``, and a warning is logged; square pixels have neither."""
    import logging

    # caplog listens at the root: a CLI run earlier in this process (logutil.setup_logging) left the
    # stemfast logger not propagating
    monkeypatch.setattr(logging.getLogger("stemfast"), "propagate", True)
    cal = [{"offset": 0.0, "scale": 0.015, "units": "nm"}, {"offset": 0.0, "scale": 0.0125, "units": "nm"}]
    tifffile.imwrite(tmp_path / "a.tif", img.astype(np.float32), imagej=True, resolution=(1 / 0.0125, 1 / 0.015),
                     metadata={"unit": "nm"})
    tifffile.imwrite(tmp_path / "sq.tif", img.astype(np.float32), imagej=True, resolution=(80.0, 80.0),
                     metadata={"unit": "nm"})
    with caplog.at_level(logging.WARNING, logger="stemfast"):
        for mg in (read(tmp_path / "a.tif"),
                   read(_ndata(tmp_path / "a.ndata", img, _nion_props(dimensional_calibrations=cal)))):
            assert mg.pixel_size == pytest.approx(0.0125) and mg.metadata["pixel_size_y"] == pytest.approx(0.015)
    assert sum("anisotropic pixels (x 0.0125, y 0.015 nm)" in r.getMessage() for r in caplog.records) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stemfast"):
        sq = read(tmp_path / "sq.tif")
    assert sq.pixel_size == pytest.approx(0.0125) and "pixel_size_y" not in sq.metadata
    assert not any("anisotropic" in r.getMessage() for r in caplog.records)
