"""Aspect-ratio tables (spec §7), bin lookup and its tie rule, resize-and-crop, and size validation."""
import pytest
import torch

from pixart_core import bins
from pixart_core.bins import (ASPECT_RATIO_256, ASPECT_RATIO_512, ASPECT_RATIO_1024, ASPECT_RATIO_2048,
                              ASPECT_RATIO_2880, ASPECT_RATIO_4096, BIN_TABLES, check_size, nearest_bin,
                              resize_and_center_crop)

# Rows copied by hand from the spec's §7 table: ratio -> (256, 512, 1024, 2048) as "hxw", T1024, T2048.
SPEC_ROWS = {
    "0.25": ("128x512", "256x1024", "512x2048", "1024x4096", True, True),
    "0.26": ("128x496", "256x992", "512x1984", "1024x3968", False, True),
    "0.27": ("128x480", "256x960", "512x1920", "1024x3840", False, False),
    "0.28": ("128x464", "256x928", "512x1856", "1024x3712", True, False),
    "0.32": ("144x448", "288x896", "576x1792", "1152x3584", True, True),
    "0.48": ("176x368", "352x736", "704x1472", "1408x2944", True, True),
    "0.57": ("192x336", "384x672", "768x1344", "1536x2688", True, True),
    "0.94": ("240x256", "480x512", "960x1024", "1920x2048", True, True),
    "1.0": ("256x256", "512x512", "1024x1024", "2048x2048", True, True),
    "1.46": ("304x208", "608x416", "1216x832", "2432x1664", True, True),
    "2.09": ("368x176", "736x352", "1472x704", "2944x1408", True, True),
    "2.89": ("416x144", "832x288", "1664x576", "3328x1152", False, False),
    "3.0": ("432x144", "864x288", "1728x576", "3456x1152", True, True),
    "3.11": ("448x144", "896x288", "1792x576", "3584x1152", False, False),
    "3.62": ("464x128", "928x256", "1856x512", "3712x1024", False, False),
    "3.88": ("496x128", "992x256", "1984x512", "3968x1024", False, False),
    "4.0": ("512x128", "1024x256", "2048x512", "4096x1024", True, True),
}
SPEC_2880 = {"0.25": "1408x5760", "0.34": "1600x4672", "0.47": "1920x4096", "0.93": "2688x2880",
             "1.0": "2880x2880", "1.12": "3008x2688", "1.7": "3584x2112", "2.03": "3904x1920",
             "2.92": "4672x1600", "3.12": "4992x1600", "3.68": "5184x1408", "4.0": "5760x1408"}
ALL_KEYS = ["0.25", "0.26", "0.27", "0.28", "0.32", "0.33", "0.35", "0.4", "0.42", "0.48", "0.5", "0.52", "0.57",
            "0.6", "0.68", "0.72", "0.78", "0.82", "0.88", "0.94", "1.0", "1.07", "1.13", "1.21", "1.29", "1.38",
            "1.46", "1.67", "1.75", "2.0", "2.09", "2.4", "2.5", "2.89", "3.0", "3.11", "3.62", "3.75", "3.88", "4.0"]


def hw(s):
    h, w = s.split("x")
    return int(h), int(w)


@pytest.mark.parametrize("key", sorted(SPEC_ROWS))
def test_spec_rows(key):
    r256, r512, r1024, r2048, in_t1024, in_t2048 = SPEC_ROWS[key]
    assert ASPECT_RATIO_256[key] == hw(r256)
    assert ASPECT_RATIO_512[key] == hw(r512)
    assert ASPECT_RATIO_1024[key] == hw(r1024)
    assert ASPECT_RATIO_2048[key] == hw(r2048)
    for res in (256, 512, 1024):
        assert (key in bins.TEST_BIN_TABLES[res]) == in_t1024
    assert (key in bins.ASPECT_RATIO_2048_TEST) == in_t2048
    assert (key in bins.ASPECT_RATIO_4096_TEST) == in_t2048


def test_keys_counts_and_scaling():
    for res in (256, 512, 1024, 2048, 4096):
        assert list(BIN_TABLES[res]) == ALL_KEYS
    assert len(ASPECT_RATIO_2880) == 40
    for k in ALL_KEYS:
        h, w = ASPECT_RATIO_256[k]
        assert ASPECT_RATIO_512[k] == (2 * h, 2 * w)
        assert ASPECT_RATIO_1024[k] == (4 * h, 4 * w)
        assert ASPECT_RATIO_2048[k] == (8 * h, 8 * w)
        assert ASPECT_RATIO_4096[k] == tuple(4 * v for v in ASPECT_RATIO_1024[k])
        # keys are the bins' h/w, rounded (a few loosely, e.g. 0.26 for 128/496 = 0.258)
        assert abs(float(k) - h / w) < 0.03
    for res in (256, 512, 1024):
        assert len(bins.TEST_BIN_TABLES[res]) == 33
    assert len(bins.ASPECT_RATIO_2048_TEST) == 33 and "0.26" in bins.ASPECT_RATIO_2048_TEST
    assert "0.28" not in bins.ASPECT_RATIO_2048_TEST
    assert ASPECT_RATIO_4096["1.0"] == (4096, 4096) and bins.ASPECT_RATIO_4096_TEST["0.25"] == (2048, 8192)
    assert all(h % 16 == 0 and w % 16 == 0 for t in (ASPECT_RATIO_512, ASPECT_RATIO_2880) for h, w in t.values())


def test_2880_table():
    assert list(ASPECT_RATIO_2880)[:8] == ["0.25", "0.26", "0.27", "0.28", "0.32", "0.33", "0.34", "0.4"]
    for k, v in SPEC_2880.items():
        assert ASPECT_RATIO_2880[k] == hw(v)


def test_tables_match_diffusers_bins():
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN,
                                                                        ASPECT_RATIO_1024_BIN)
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
    as_ints = (lambda t: {k: (int(h), int(w)) for k, (h, w) in t.items()})
    assert as_ints(ASPECT_RATIO_256_BIN) == bins.ASPECT_RATIO_256_TEST
    assert as_ints(ASPECT_RATIO_512_BIN) == bins.ASPECT_RATIO_512_TEST
    assert as_ints(ASPECT_RATIO_1024_BIN) == bins.ASPECT_RATIO_1024_TEST
    assert as_ints(ASPECT_RATIO_2048_BIN) == ASPECT_RATIO_2048  # diffusers' 2048 bins are the full table
    assert list(ASPECT_RATIO_1024_BIN) == list(bins.ASPECT_RATIO_1024_TEST)  # order matters for ties


def test_nearest_bin_examples():
    assert nearest_bin(1024, 1024, 1024) == (1024, 1024)
    assert nearest_bin(1080, 1920, 1024) == (768, 1344)  # 0.5625 -> 0.57
    assert nearest_bin(1920, 1080, 2048) == (2688, 1536)  # 1.777 -> 1.75
    assert nearest_bin(100, 1000, 512) == (256, 1024)  # 0.1, below every key -> 0.25
    assert nearest_bin(5000, 100, 256) == (512, 128)  # 50 -> 4.0
    assert nearest_bin(290, 1000, 1024) == (512, 1856)  # 0.29 -> 0.28
    assert nearest_bin(290, 1000, 1024, table="test") == (512, 1856)
    assert nearest_bin(270, 1000, 1024) == (512, 1920)  # 0.27 exists only in the full table
    assert nearest_bin(270, 1000, 1024, table="test") == (512, 1856)
    assert nearest_bin(1000, 1000, 2880) == (2880, 2880)
    assert nearest_bin(1000, 1000, 4096, table="test") == (4096, 4096)


@pytest.mark.parametrize("h,w,res,first,second", [
    (768, 1024, 1024, "0.72", "0.78"),  # 3:4 = 0.75 sits exactly between two keys
    (1280, 1024, 1024, "1.21", "1.29"),  # 5:4 = 1.25
    (1920, 1024, 2048, "1.75", "2.0"),  # 15:8 = 1.875
])
def test_nearest_bin_tie_first_key_wins(h, w, res, first, second):
    table = BIN_TABLES[res]
    ar = h / w
    assert abs(float(first) - ar) == abs(float(second) - ar)  # a true floating-point tie
    assert list(table).index(first) < list(table).index(second)
    assert nearest_bin(h, w, res) == table[first]


def test_nearest_bin_agrees_with_diffusers():
    from diffusers.image_processor import PixArtImageProcessor
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(64, 4096, (300, 2), generator=g).tolist() + [[768, 1024], [1280, 1024], [3, 8]]
    for table in ("full", "test"):
        for res in (512, 1024, 2048):
            ratios = bins.get_table(res, table)
            for h, w in sizes:
                assert nearest_bin(h, w, res, table) == PixArtImageProcessor.classify_height_width_bin(h, w, ratios)


def test_nearest_bin_errors():
    with pytest.raises(ValueError, match="no test aspect-ratio table for resolution 2880"):
        nearest_bin(512, 512, 2880, table="test")
    with pytest.raises(ValueError, match="resolution 300; available: \\[256, 512, 1024, 2048, 2880, 4096\\]"):
        nearest_bin(512, 512, 300)
    with pytest.raises(ValueError, match="table must be 'full' or 'test', got 'small'"):
        nearest_bin(512, 512, 1024, table="small")
    with pytest.raises(ValueError, match="must be positive, got 0x512"):
        nearest_bin(0, 512, 1024)


def test_resize_and_center_crop_values():
    # A linear ramp stays a ramp under bilinear resampling (align_corners=False), so values are predictable.
    x = torch.arange(8, dtype=torch.float32).view(1, 1, 1, 8).expand(2, 3, 4, 8).contiguous()
    out = resize_and_center_crop(x, 8, 8)  # ratio max(8/4, 8/8) = 2 -> 8x16, crop columns 4..11
    assert out.shape == (2, 3, 8, 8)
    full = torch.nn.functional.interpolate(x, size=(8, 16), mode="bilinear", align_corners=False)
    assert torch.equal(out, full[..., :, 4:12])
    expected = torch.tensor([1.75, 2.25, 2.75, 3.25, 3.75, 4.25, 4.75, 5.25])
    assert torch.allclose(out[0, 0, 0], expected)
    assert torch.equal(resize_and_center_crop(x, 4, 8), x)  # same size: untouched


@pytest.mark.parametrize("src,dst", [((64, 96), (40, 100)), ((128, 128), (100, 60)), ((33, 17), (70, 70)),
                                     ((1024, 768), (1000, 750)), ((96, 64), (97, 63))])
def test_resize_and_center_crop_matches_diffusers(src, dst):
    from diffusers.image_processor import PixArtImageProcessor
    x = torch.randn(2, 3, *src, generator=torch.Generator().manual_seed(1))
    out = resize_and_center_crop(x, *dst)
    ref = PixArtImageProcessor.resize_and_crop_tensor(x, new_width=dst[1], new_height=dst[0])
    assert out.shape == (2, 3, *dst)
    assert torch.equal(out, ref)


def test_resize_floor_offset():
    # 5 rows -> 2 rows at ratio max(2/5, 4/4) = 1: nothing resized, crop starts at floor(3/2) = 1
    x = torch.arange(20, dtype=torch.float32).view(1, 1, 5, 4)
    assert torch.equal(resize_and_center_crop(x, 2, 4), x[..., 1:3, :])


def test_check_size_ok():
    assert check_size(1024, 768) == (1024, 768)
    assert check_size(16, 4096) == (16, 4096)
    assert check_size(8192, 16, allow_larger=True) == (8192, 16)
    assert check_size(2048, 2048, max_side=2048) == (2048, 2048)


@pytest.mark.parametrize("h,w,kwargs,message", [
    (1000, 1024, {}, "height 1000 is not a multiple of 16 .*; use 992 or 1008"),
    (1024, 1030, {}, "width 1030 is not a multiple of 16 .*; use 1024 or 1040"),
    (1024, 8, {}, "width 8 is not a multiple of 16 .*; use 16$"),
    (0, 512, {}, "height must be positive, got 0; use a multiple of 16"),
    (512, -64, {}, "width must be positive, got -64"),
    (4112, 512, {}, "height 4112 is larger than the maximum side 4096; use at most 4096, or pass allow_larger=True"),
    (512, 2064, {"max_side": 2048}, "width 2064 is larger than the maximum side 2048"),
    (512.0, 512, {}, "height must be an integer number of pixels, got 512.0"),
    (True, 512, {}, "height must be an integer number of pixels, got True"),
])
def test_check_size_errors(h, w, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_size(h, w, **kwargs)


def test_resize_guards_float_truncation():
    # 1344 * (1363 / 1344) is 1362.999..., which int() truncates; diffusers then slices [-1:1362] and
    # returns a 1-pixel-wide image. Here the covering size is never allowed below the request.
    assert int(1344 * (1363 / 1344)) == 1362
    x = torch.rand(1, 3, 704, 1344, generator=torch.Generator().manual_seed(2))
    out = resize_and_center_crop(x, 700, 1363)
    assert out.shape == (1, 3, 700, 1363)
    full = torch.nn.functional.interpolate(x, size=(713, 1363), mode="bilinear", align_corners=False)
    assert torch.equal(out, full[..., 6:706, :])
