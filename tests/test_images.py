"""Image I/O of the SR tool: every bad input gets one line naming it, every convertible one becomes 8-bit RGB."""

import errno
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import tifffile
from PIL import ExifTags, Image, ImageFile
from skimage import data

from tadsr_jax.images import ImageError, list_images, output_path, read_rgb, write_png_atomic

# 96 x 128 (H x W) of the astronaut: not square, so a transpose changes the shape.
PHOTO = np.ascontiguousarray(data.astronaut()[40:136, 180:308])
# 16-bit samples and their 8-bit rounding round(x / 257); 383 and 65406 are just under a half, 129 and 65407 over.
SAMPLES_16 = np.array([0, 65535, 32896, 257, 383, 128, 129, 65406, 65407], np.uint16)
ROUNDED_8 = np.array([0, 255, 128, 1, 1, 0, 1, 254, 255], np.uint8)


def _save(pixels: np.ndarray, path, **kwargs) -> str:
    Image.fromarray(pixels).save(path, **kwargs)
    return str(path)


def _write_16_bit_png(path, samples: np.ndarray) -> str:
    """A 16-bit PNG (Pillow cannot write 16-bit colour): 2 channels are gray + alpha, 3 RGB, 4 RGBA."""
    color_type = {2: 4, 3: 2, 4: 6}[samples.shape[2]]
    height, width = samples.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in samples)  # filter type 0 before each row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
        )
    return str(path)


def _cut_in_half(path: str) -> str:
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[: len(content) // 2])
    return path


# Each builds a bad input in a folder and returns its path and the start of the expected problem.
def _empty_file(folder):
    (folder / "empty.png").touch()
    return str(folder / "empty.png"), "empty file (0 bytes)"


def _text_file(folder):
    (folder / "x.png").write_text("not an image, just text\n")
    return str(folder / "x.png"), "not an image Pillow can read"


def _truncated_png(folder):
    return _cut_in_half(_save(PHOTO, folder / "cut.png")), "corrupt or truncated data: image file is truncated"


def _truncated_jpeg(folder):
    return _cut_in_half(_save(PHOTO, folder / "cut.jpg")), "corrupt or truncated data: image file is truncated"


def _corrupt_png(folder):
    """Valid signature and header chunk, then random bytes from the start of the pixel data on."""
    with open(_save(PHOTO, folder / "corrupt.png"), "rb") as f:
        content = f.read()
    start = content.index(b"IDAT") + 4
    (folder / "corrupt.png").write_bytes(content[:start] + np.random.default_rng(0).bytes(len(content) - start))
    return str(folder / "corrupt.png"), "corrupt or truncated data: "


def _one_pixel(folder):
    return _save(PHOTO[:1, :1], folder / "dot.png"), "too small: 1x1 pixels (need at least 8x8)"


def _float_tiff(folder):
    tifffile.imwrite(folder / "depth.tif", np.ones((16, 16), np.float32))
    return str(folder / "depth.tif"), "unsupported mode F (32-bit float)"


def _int32_tiff_beyond_16_bits(folder):
    tifffile.imwrite(folder / "counts.tif", np.full((16, 16), 70_000, np.int32))
    return str(folder / "counts.tif"), "unsupported mode I: 32-bit samples outside 0..65535"


def _directory(folder):
    (folder / "folder.png").mkdir()
    return str(folder / "folder.png"), "Is a directory"


def _missing_file(folder):
    return str(folder / "missing.png"), "No such file or directory"


@pytest.mark.parametrize(
    "make_bad_input",
    [
        _empty_file,
        _text_file,
        _truncated_png,
        _truncated_jpeg,
        _corrupt_png,
        _one_pixel,
        _float_tiff,
        _int32_tiff_beyond_16_bits,
        _directory,
        _missing_file,
    ],
)
def test_bad_input_gets_one_line_naming_file_and_problem(tmp_path, make_bad_input):
    path, problem = make_bad_input(tmp_path)
    with pytest.raises(ImageError) as error:
        read_rgb(path)
    message = str(error.value)
    assert message.startswith(f"{path}: {problem}")
    assert "\n" not in message
    assert error.value.path == path


def test_unreadable_file_reports_permission_denied(tmp_path, monkeypatch):
    path = _save(PHOTO, tmp_path / "secret.png")
    os.chmod(path, 0)
    if os.geteuid() == 0:  # root reads any file: have the open fail as it does for other users

        def denied(fp, *args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(fp))

        monkeypatch.setattr(Image, "open", denied)
    with pytest.raises(ImageError, match="^.*secret.png: Permission denied$"):
        read_rgb(path)


def test_too_large_is_refused_from_header_without_decoding(tmp_path, monkeypatch):
    path = _save(np.zeros((100, 100, 3), np.uint8), tmp_path / "big.png")

    def no_decoding(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(AssertionError, match="pixels decoded"):  # the patch does catch a decode
        read_rgb(path, max_pixels=10_000)
    with pytest.raises(ImageError) as error:
        read_rgb(path, max_pixels=1000)
    assert str(error.value) == f"{path}: too large: 100x100 pixels (limit 1000)"


@pytest.mark.parametrize(
    "pillow_limit, bomb_warnings", [(1000, "default"), (6000, "error")], ids=["bomb_error", "bomb_warning_as_error"]
)
def test_pillow_decompression_bomb_limit_is_reported_as_too_large(tmp_path, monkeypatch, pillow_limit, bomb_warnings):
    path = _save(np.zeros((100, 100, 3), np.uint8), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    with warnings.catch_warnings(), pytest.raises(ImageError) as error:
        warnings.simplefilter(bomb_warnings, Image.DecompressionBombWarning)
        read_rgb(path)
    assert str(error.value).startswith(f"{path}: too large: Image size (10000 pixels) exceeds limit")


def test_valid_rgb_png_round_trips_without_notes(tmp_path):
    path = _save(PHOTO, tmp_path / "photo.png")
    image = read_rgb(path)
    assert image.path == path
    assert image.notes == ()
    assert image.pixels.dtype == np.uint8 and image.pixels.flags.c_contiguous
    np.testing.assert_array_equal(image.pixels, PHOTO)


@pytest.mark.parametrize(
    "write",
    [
        lambda path, samples: _save(samples, path.with_suffix(".png")),  # Pillow keeps uint16 as mode I;16
        lambda path, samples: (
            tifffile.imwrite(path.with_suffix(".tif"), samples, byteorder=">") or str(path.with_suffix(".tif"))
        ),  # mode I;16B
        lambda path, samples: (
            tifffile.imwrite(path.with_suffix(".tif"), samples.astype(np.int32)) or str(path.with_suffix(".tif"))
        ),  # mode I
    ],
    ids=["png_I;16", "tiff_I;16B", "tiff_I"],
)
def test_16_bit_grayscale_is_rounded_to_8_bits(tmp_path, write):
    path = write(tmp_path / "deep", np.tile(SAMPLES_16, (8, 1)))
    with Image.open(path) as opened:
        assert opened.mode in ("I;16", "I;16B", "I")
    image = read_rgb(path)
    np.testing.assert_array_equal(image.pixels, np.tile(ROUNDED_8[None, :, None], (8, 1, 3)))
    assert image.pixels.flags.c_contiguous
    assert image.notes == ("16-bit samples reduced to 8 bits", "grayscale converted to RGB")


@pytest.mark.parametrize(
    "channels, extension",
    [(3, "png"), (4, "png"), (2, "png"), (3, "tif")],
    ids=["png_rgb", "png_rgba", "png_gray_alpha", "tiff_rgb"],
)
def test_16_bit_colour_is_reduced_to_its_high_byte_by_pillow(tmp_path, channels, extension):
    samples = np.stack([np.tile(SAMPLES_16, (8, 1))[:, ::step] for step in (1, -1, 1, 1)[:channels]], axis=2)
    path = str(tmp_path / f"deep.{extension}")
    if extension == "png":
        _write_16_bit_png(path, samples)
    else:
        tifffile.imwrite(path, samples, photometric="rgb")
    image = read_rgb(path)
    colour = samples[..., :3] if channels > 2 else np.repeat(samples[..., :1], 3, axis=2)
    np.testing.assert_array_equal(image.pixels, colour >> 8)
    alpha_note = ("alpha channel dropped",) if channels in (2, 4) else ()
    assert image.notes == ("16-bit samples reduced to 8 bits",) + alpha_note


def test_alpha_is_dropped_and_colours_kept(tmp_path):
    alpha = np.linspace(0, 255, PHOTO.shape[0] * PHOTO.shape[1]).astype(np.uint8).reshape(PHOTO.shape[:2])
    image = read_rgb(_save(np.dstack([PHOTO, alpha]), tmp_path / "rgba.png"))
    np.testing.assert_array_equal(image.pixels, PHOTO)
    assert image.notes == ("alpha channel dropped",)


def test_palette_is_converted_to_its_colours(tmp_path):
    palette = Image.fromarray(PHOTO).quantize(colors=32)
    palette.save(tmp_path / "palette.png")
    image = read_rgb(str(tmp_path / "palette.png"))
    np.testing.assert_array_equal(image.pixels, np.asarray(palette.convert("RGB")))
    assert image.notes == ("palette converted to RGB",)


def test_grayscale_is_replicated_to_three_channels(tmp_path):
    gray = np.asarray(Image.fromarray(PHOTO).convert("L"))
    image = read_rgb(_save(gray, tmp_path / "gray.png"))
    np.testing.assert_array_equal(image.pixels, np.repeat(gray[:, :, None], 3, axis=2))
    assert image.notes == ("grayscale converted to RGB",)


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    path = str(tmp_path / "print.jpg")
    Image.fromarray(PHOTO).convert("CMYK").save(path, quality=95)
    with Image.open(path) as opened:
        assert opened.mode == "CMYK"
    image = read_rgb(path)
    assert image.pixels.shape == PHOTO.shape
    assert np.abs(image.pixels.astype(int) - PHOTO).mean() < 3  # JPEG loss only
    assert image.notes == ("CMYK converted to RGB",)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored rotated: turn 90 degrees clockwise to display
    path = _save(PHOTO, tmp_path / "phone.jpg", exif=exif)
    with Image.open(path) as opened:
        stored = np.asarray(opened.convert("RGB"))
    image = read_rgb(path)
    np.testing.assert_array_equal(image.pixels, np.rot90(stored, k=-1))
    assert image.pixels.shape == (PHOTO.shape[1], PHOTO.shape[0], 3)
    assert image.notes == ("EXIF orientation applied",)


@pytest.mark.parametrize("extension, conversion_notes", [("gif", ("palette converted to RGB",)), ("tif", ())])
def test_multi_frame_file_gives_its_first_frame(tmp_path, extension, conversion_notes):
    frames = [Image.fromarray(np.full((16, 24, 3), value, np.uint8)) for value in (30, 120, 210)]
    path = str(tmp_path / f"frames.{extension}")
    frames[0].save(path, save_all=True, append_images=frames[1:])
    image = read_rgb(path)
    np.testing.assert_array_equal(image.pixels, np.full((16, 24, 3), 30, np.uint8))
    assert image.notes == ("first of 3 frames",) + conversion_notes


def test_list_images_of_directory_is_sorted_and_skips_non_images(tmp_path):
    for name in ("b.png", "a.JPG", "c.jpeg", "notes.txt", ".hidden.png", "sub.png/d.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert list_images(str(tmp_path)) == [str(tmp_path / name) for name in ("a.JPG", "b.png", "c.jpeg")]


def test_list_images_of_file_is_that_file_whatever_its_extension(tmp_path):
    (tmp_path / "scan.raw").write_bytes(b"")
    assert list_images(str(tmp_path / "scan.raw")) == [str(tmp_path / "scan.raw")]


def test_list_images_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(ImageError) as error:
        list_images(missing)
    assert str(error.value) == f"{missing}: no such file or directory"
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ImageError) as error:
        list_images(str(tmp_path))
    assert str(error.value).startswith(f"{tmp_path}: no image files (.png, .jpg, ")
    assert "\n" not in str(error.value)


def test_write_png_atomic_round_trips_and_creates_directory(tmp_path):
    path = tmp_path / "new" / "out.png"
    write_png_atomic(str(path), PHOTO)
    with Image.open(path) as written:
        np.testing.assert_array_equal(np.asarray(written), PHOTO)
    assert os.listdir(path.parent) == ["out.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("existing", [None, b"previous output"], ids=["no_file", "existing_file"])
def test_write_png_atomic_failure_leaves_no_partial_file(tmp_path, monkeypatch, existing):
    path = tmp_path / "out.png"
    if existing is not None:
        path.write_bytes(existing)

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n half of a PNG")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="No space left on device"):
        write_png_atomic(str(path), PHOTO)
    assert os.listdir(tmp_path) == ([] if existing is None else ["out.png"])
    if existing is not None:
        assert path.read_bytes() == existing


@pytest.mark.parametrize(
    "pixels",
    [PHOTO.astype(np.float32), PHOTO[..., 0], PHOTO[:, :, [0, 1, 2, 2]], PHOTO[:0]],
    ids=["float32", "gray", "four_channels", "empty"],
)
def test_write_png_atomic_rejects_wrong_pixels(tmp_path, pixels):
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\)"):
        write_png_atomic(str(tmp_path / "out.png"), pixels)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "input_path, output_dir, suffix, expected",
    [
        ("photo.jpg", "out", "", "out/photo.png"),
        ("/data/scan.v2.TIFF", "/results", "_t200", "/results/scan.v2_t200.png"),
    ],
)
def test_output_path(input_path, output_dir, suffix, expected):
    assert output_path(input_path, output_dir, suffix) == expected
