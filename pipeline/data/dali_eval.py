"""The test-time geometry, pixel-exact to torchvision: resized sizes and crop windows.

    h, w = resized_size(375, 500, 256)            # (256, 341), torchvision's Resize(256)
    windows = ten_crop_windows(256, 341, 224)    # [(top, left, mirror), ...] in TenCrop order

torchvision's ``Resize(s)`` sets the shorter side to ``s`` and the longer one to
``int(s * long / short)`` (truncated); ``CenterCrop`` puts the window at
``int(round(margin / 2))``, and Python rounds a half to even (a 117-pixel margin gives 58, not
59). DALI's own ``resize_shorter`` rounds the longer side to nearest and its relative crop
positions round halves away from zero, so each is one pixel off on some image sizes. Here the
sizes and windows are integers computed in the DALI graph with the same arithmetic as
torchvision's code (``_compute_resized_output_size``, ``center_crop``, ``five_crop``,
``ten_crop`` in torchvision 0.29), and the windows are cut with absolute ``fn.slice`` anchors.
The plain-Python functions are the reference the graph is tested against.
"""

from __future__ import annotations

from typing import Any

# ---------------------------------------------------------------- the reference, in Python


def resized_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """(height, width) of torchvision's ``Resize(shorter)`` (no max_size) on a height x width image."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = shorter * long // short  # == int(shorter * long / short) for image-sized integers
    return (new_long, shorter) if width <= height else (shorter, new_long)


def center_offset(margin: int) -> int:
    """torchvision's ``int(round(margin / 2.0))``: a half rounds to the even neighbour."""
    half, odd = divmod(margin, 2)
    return half + odd * (half % 2)


def ten_crop_windows(height: int, width: int, crop: int) -> list[tuple[int, int, bool]]:
    """(top, left, mirrored) of ``TenCrop(crop)`` on a height x width image, in its order.

    The first five are tl, tr, bl, br, centre; the second five are the same crops of the
    horizontally flipped image, i.e. the mirror of the window at ``left' = margin_w - left``
    of the original. For an odd margin the flipped centre is therefore one pixel right of the
    unflipped one.
    """
    mh, mw = height - crop, width - crop
    if mh < 0 or mw < 0:
        raise ValueError(f"crop {crop} is larger than the {height}x{width} image")
    five = [(0, 0), (0, mw), (mh, 0), (mh, mw), (center_offset(mh), center_offset(mw))]
    return [(t, left, False) for t, left in five] + [(t, mw - left, True) for t, left in five]


# ---------------------------------------------------------------- the same arithmetic in a DALI graph


def _half_to_even(margin: Any) -> Any:
    half = margin // 2
    return half + (margin - 2 * half) * (half - 2 * (half // 2))


def _as_int(flag: Any) -> Any:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    return fn.cast(flag, dtype=types.INT64)


def resize_like_torchvision(images: Any, jpegs: Any, shorter: int) -> tuple[Any, Any, Any]:
    """``images`` resized as ``Resize(shorter)`` does; returns (resized, height, width) DataNodes.

    Args:
        images: decoded HWC images (CPU or GPU).
        jpegs: the encoded files they came from (CPU), for ``fn.peek_image_shape``, which applies
            the EXIF orientation exactly as the decoder does.
        shorter: the shorter side after resizing.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    shape = fn.peek_image_shape(jpegs, dtype=types.INT64)  # [H, W, C]
    h, w = shape[0], shape[1]
    portrait = _as_int(w <= h)
    new_long = (shorter * dmath.max(h, w)) // dmath.min(h, w)
    new_h = portrait * new_long + (1 - portrait) * shorter
    new_w = portrait * shorter + (1 - portrait) * new_long
    resized = fn.resize(
        images,
        resize_y=fn.cast(new_h, dtype=types.FLOAT),
        resize_x=fn.cast(new_w, dtype=types.FLOAT),
        antialias=True,
    )
    return resized, new_h, new_w


def crop_windows(mode: str, height: Any, width: Any, crop: int) -> list[tuple[Any, Any, bool]]:
    """(top, left, mirrored) DataNodes of ``CenterCrop`` ("center") or ``TenCrop`` ("tencrop")."""
    mh, mw = height - crop, width - crop
    top, left = _half_to_even(mh), _half_to_even(mw)
    if mode == "center":
        return [(top, left, False)]
    zero = mh * 0
    five = [(zero, zero), (zero, mw), (mh, zero), (mh, mw), (top, left)]
    return [(t, x, False) for t, x in five] + [(t, mw - x, True) for t, x in five]


def cut(images: Any, top: Any, left: Any, crop: int) -> Any:
    """The ``crop`` x ``crop`` window at (top, left) of HWC images, by absolute coordinates."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    start = fn.cast(fn.stack(left, top), dtype=types.INT32)  # axis_names "WH": x first
    return fn.slice(images, start=start, shape=[crop, crop], axis_names="WH")
