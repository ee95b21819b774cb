"""timm's eval geometry (resize short side, centre crop) with Pillow's antialiased bicubic, compiled by numba.

FFCV's own centre-crop decoder resizes with OpenCV's INTER_AREA, which upsamples small images (28 px
Fashion-MNIST -> 112 px) into blocks and moves embeddings far from the ImageFolder path. This module
reproduces, inside FFCV's JIT pipeline, what torchvision does on a PIL image:

    Resize(resize, BICUBIC)  ->  short side = resize, long side = int(resize * long / short)
    CenterCrop(size)         ->  offsets round((resized - size) / 2) (round half to even)

with Pillow's resampling arithmetic: separable bicubic (a = -0.5) whose support widens by the downscale
factor (antialiasing), coefficients normalised in double and rounded to 22-bit fixed point, a horizontal pass
into an 8-bit intermediate and then a vertical pass, each rounded and clipped to 0..255. Only the rows and
columns inside the crop are computed. The result equals the PIL path pixel for pixel (tests check this).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

PRECISION_BITS = 32 - 8 - 2
BICUBIC_SUPPORT = 2.0


@njit(nogil=True, cache=True)
def _bicubic(x: float) -> float:
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@njit(nogil=True, cache=True)
def _trunc(x: float) -> int:
    """C's (int) cast: towards zero."""
    return int(x) if x >= 0 else -int(-x)


@njit(nogil=True, cache=True)
def bicubic_coeffs(in_size: int, out_size: int, first: int, count: int):
    """Pillow's fixed-point coefficients for outputs `first .. first+count-1` of an `in_size -> out_size` resize.

    Returns (start int64[count], taps int64[count], weights int64[count, ksize]).
    """
    scale = in_size / out_size
    filterscale = scale if scale > 1.0 else 1.0
    support = BICUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    start = np.zeros(count, np.int64)
    taps = np.zeros(count, np.int64)
    weights = np.zeros((count, ksize), np.int64)
    k = np.zeros(ksize, np.float64)
    for j in range(count):
        xx = first + j
        center = (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = _trunc(center - support + 0.5)
        if xmin < 0:
            xmin = 0
        xmax = _trunc(center + support + 0.5)
        if xmax > in_size:
            xmax = in_size
        xmax -= xmin
        ww = 0.0
        for x in range(xmax):
            w = _bicubic((x + xmin - center + 0.5) * ss)
            k[x] = w
            ww += w
        for x in range(xmax):
            v = k[x] / ww if ww != 0.0 else k[x]
            if v < 0:
                weights[j, x] = _trunc(-0.5 + v * (1 << PRECISION_BITS))
            else:
                weights[j, x] = _trunc(0.5 + v * (1 << PRECISION_BITS))
        start[j] = xmin
        taps[j] = xmax
    return start, taps, weights


@njit(nogil=True, cache=True)
def _clip8(acc: int) -> int:
    v = acc >> PRECISION_BITS
    if v < 0:
        return 0
    if v > 255:
        return 255
    return v


@njit(nogil=True, cache=True)
def _round_half_even(x: float) -> int:
    r = math.floor(x + 0.5)
    if r - x == 0.5 and r % 2 != 0:
        r -= 1
    return int(r)


@njit(nogil=True, cache=True)
def resized_shape(height: int, width: int, resize: int):
    """torchvision's Resize(int): short side -> resize, long side -> int(resize * long / short)."""
    if width <= height:
        return int(resize * height / width), resize
    return resize, int(resize * width / height)


@njit(nogil=True, cache=True)
def resize_center_crop(src, resize: int, dst) -> None:
    """src uint8 [H, W, 3] -> dst uint8 [S, S, 3]: bicubic resize of the short side to `resize`, centre crop S."""
    height, width = src.shape[0], src.shape[1]
    out_h, out_w = dst.shape[0], dst.shape[1]
    rh, rw = resized_shape(height, width, resize)
    top = _round_half_even((rh - out_h) / 2.0)
    left = _round_half_even((rw - out_w) / 2.0)
    xs, xt, xk = bicubic_coeffs(width, rw, left, out_w)
    ys, yt, yk = bicubic_coeffs(height, rh, top, out_h)
    row0 = ys[0]
    row1 = ys[out_h - 1] + yt[out_h - 1]
    for j in range(out_h):
        row1 = max(row1, ys[j] + yt[j])
        row0 = min(row0, ys[j])
    tmp = np.empty((row1 - row0, out_w, 3), np.uint8)
    half = 1 << (PRECISION_BITS - 1)
    for y in range(row0, row1):  # horizontal pass into an 8-bit intermediate (Pillow's order)
        for i in range(out_w):
            for c in range(3):
                acc = half
                for t in range(xt[i]):
                    acc += np.int64(src[y, xs[i] + t, c]) * xk[i, t]
                tmp[y - row0, i, c] = _clip8(acc)
    for j in range(out_h):  # vertical pass
        for i in range(out_w):
            for c in range(3):
                acc = half
                for t in range(yt[j]):
                    acc += np.int64(tmp[ys[j] + t - row0, i, c]) * yk[j, t]
                dst[j, i, c] = _clip8(acc)
