"""No finite input gives a non-finite output (issue 10 item 2): every backend, dtype and magnitude.

The reference is the float64 exact map of the *same* (dtype-rounded) input, computed on the input
scaled by an exact power of two to max |G_ij| ~ 1 and rescaled by the scale law ``2^(k p)`` (so the
reference itself never over- or underflows).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import matrix_with_spectrum
from htmuon import polar, spectral_power
from htmuon.spectral import NS_EPS, _restore_raw_scale, accelerator_paths, pow2, resolve_method

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
METHODS = ["svd", "eigh", "ns", "fast", "fast5", "auto", "polar"]
#: Relative Frobenius tolerance per backend on a well-conditioned spectrum (s in [0.3, 1] of s_max),
#: before the output's own rounding to its dtype (added per dtype below). For "fast"/"fast5" it is
#: the fitted map's largest pointwise error on x in [0.2, 1] over p in [0, 1] (6.1% / 16.9%: a
#: 1 x n matrix has one singular value), plus bfloat16 work. "ns" and "polar" are Muon's NS5
#: (singular values in ~[0.7, 1.2] by design), so only the scale is checked loosely there.
TOLERANCE = {"svd": 1e-5, "eigh": 1e-5, "fast": 0.08, "fast5": 0.2, "ns": 0.35, "polar": 0.35}


def _exponent_range(dtype: torch.dtype) -> tuple[int, int]:
    """Binary exponents ``k`` of max |G_ij| = f 2^k, f in [1, 2): from the smallest subnormal to max."""
    fi = torch.finfo(dtype)
    subnormal_bits = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}[dtype]
    return math.frexp(fi.smallest_normal)[1] - 1 - subnormal_bits, math.frexp(fi.max)[1] - 1


def _scaled(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x 2^k`` in float64 in two exact steps (``2^k`` alone may not be representable)."""
    half = torch.tensor(k // 2)
    return x * pow2(half, torch.float64) * pow2(torch.tensor(k - k // 2), torch.float64)


def _exact(G: torch.Tensor, p: float) -> torch.Tensor:
    U, s, Vh = torch.linalg.svd(G, full_matrices=False)
    return (U * s.pow(p)) @ Vh


def _case(m: int, n: int, k: int, f: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A well-conditioned ``m x n`` matrix with max |G_ij| = f 2^k (capped at the dtype's max), in dtype."""
    base = matrix_with_spectrum(torch.linspace(1.0, 0.3, min(m, n), dtype=torch.float64), m, n, seed=seed)
    base = base / base.abs().max() * f
    return _scaled(base, k).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)


def _apply(method: str, G: torch.Tensor, p: float) -> torch.Tensor:
    return polar(G) if method == "polar" else spectral_power(G, p, method=method)


def _check(method: str, G: torch.Tensor, p: float) -> None:
    """Finite output of G's dtype; where the input is resolved, the raw-scale result to tolerance."""
    p = 0.0 if method == "polar" else p
    O = _apply(method, G, p)
    assert O.shape == G.shape and (method == "polar" or O.dtype == G.dtype)  # polar: the working dtype
    assert torch.isfinite(O).all(), f"{method} {G.dtype} max|G|={G.abs().max().item():.3g} p={p}"
    Gd = G.double()
    if Gd.abs().max() == 0:
        assert not O.any()
        return
    k = math.frexp(Gd.abs().max().item())[1]
    Gn = _scaled(Gd, -k)  # max |Gn_ij| in [1/2, 1)
    s = torch.linalg.svdvals(Gn)
    if s[-1] < 0.05 * s[0]:  # rounding to the dtype (subnormal entries) destroyed the spectrum
        return
    if method == "polar" and Gd.norm() < 2 * NS_EPS:  # Muon's floor on ||G||_F: G / eps, not U V^T
        return
    direction = _exact(Gn, p)
    ref = direction * torch.exp2(torch.tensor(k * p, dtype=torch.float64))
    fi = torch.finfo(G.dtype)
    if not torch.isfinite(ref).all() or ref.abs().max() > fi.max:  # not representable: capped
        # compared in direction, both sides brought near 1 first (float64's own range may not hold
        # the reference: 2^1024 p at the top of float64, or the norm of entries near its max)
        On = _scaled(O.double(), -round(k * p))
        cos = (On * direction).sum() / (On.norm() * direction.norm())
        assert cos > 0.9, (method, G.dtype, p, cos.item())
        return
    resolved = resolve_method("auto", "power", G.device) if method == "auto" else method
    # the output's rounding to its dtype: relative 2 eps, absolute one subnormal spacing per entry
    spacing = fi.smallest_normal * fi.eps
    tol = TOLERANCE[resolved] + 2 * fi.eps
    err = (O.double() - ref).norm().item()
    assert err <= tol * ref.norm().item() + math.sqrt(O.numel()) * spacing, (
        f"{method} {G.dtype} 2^{k} p={p}: rel. error {err / ref.norm().item():.3g} > {tol}"
    )


@pytest.mark.parametrize("paths", ["cpu", "accelerator"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_every_magnitude_of_the_dtype_gives_a_finite_accurate_result(method, dtype, paths):
    """On the CPU paths and on the accelerators' (always prescaled, batched; run here on CPU)."""
    with accelerator_paths() if paths == "accelerator" else contextlib.nullcontext():
        _every_magnitude(method, dtype)


def _every_magnitude(method: str, dtype: torch.dtype) -> None:
    lo, hi = _exponent_range(dtype)
    edges = [lo, lo + 3, math.frexp(torch.finfo(dtype).smallest_normal)[1] - 1, -40, -9, 0, 12, 21, 40]
    edges += [hi - 8, hi - 1, hi]
    for k in sorted({e for e in edges if lo <= e <= hi}):
        for p in (0.0, 0.125, 0.5, 0.9):
            for f in (1.0, 1.99):
                _check(method, _case(12, 20, k, f, dtype, seed=k % 7), p)
                if method == "polar":
                    break
            if method == "polar":
                break


@settings(max_examples=120, deadline=None)
@given(
    data=st.data(),
    m=st.integers(1, 10),
    n=st.integers(1, 10),
    dtype=st.sampled_from(DTYPES),
    method=st.sampled_from(METHODS),
    p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_property_finite_and_raw_scale_over_the_dtype_range(data, m, n, dtype, method, p, seed):
    """Two matrices of independent magnitudes in one batch: per-matrix scaling, any finite scale."""
    lo, hi = _exponent_range(dtype)
    ks = [data.draw(st.integers(lo, hi), label=f"k{i}") for i in range(2)]
    fs = [data.draw(st.floats(1.0, 2.0, exclude_max=True), label=f"f{i}") for i in range(2)]
    G = torch.stack([_case(m, n, k, f, dtype, seed + i) for i, (k, f) in enumerate(zip(ks, fs))])
    O = _apply(method, G, p)
    assert torch.isfinite(O).all()
    for i in range(2):
        _check(method, G[i], p)


def test_restored_raw_scale_is_capped_at_the_dtype_range_not_inf():
    """Where a (float32) backend result times 2^(e p) would exceed the output dtype, the factor is capped
    so the largest entry is just below finfo.max: finite, and the direction kept."""
    O = torch.rand(2, 8, 12) + 1.5
    e = torch.tensor([15, 2], dtype=torch.int32).view(2, 1, 1)
    out = _restore_raw_scale(O, e, 1.0 - 1e-9, torch.float16)  # 2^15 * max |O| > 65504: capped
    assert torch.isfinite(out.half()).all()
    assert 0.98 * 65504 < out[0].abs().max() <= 65504
    assert ((out[0] / out[0].norm() - O[0] / O[0].norm()).norm() < 1e-6).item()  # the direction
    assert ((out[1] - O[1] * 4.0).abs().max() < 1e-5).item()  # in range: the raw scale
    out32 = _restore_raw_scale(O.double(), torch.full((2, 1, 1), 1023), 0.999, torch.float32)
    assert out32.dtype == torch.float64 and torch.isfinite(out32.float()).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("method", ["svd", "eigh", "fast"])
def test_results_near_the_top_of_the_range_are_exact_not_capped(method, dtype):
    """p near 1 at the top of the dtype's range: the result is representable and comes out right."""
    top = math.frexp(torch.finfo(dtype).max)[1] - 1
    G = _case(64, 96, top, 1.99, dtype, seed=2)
    for p in (0.9, 0.97):
        ref = _exact(G.double(), p)
        O = spectral_power(G, p, method=method)
        assert torch.isfinite(O).all()
        err = (O.double() - ref).norm() / ref.norm()
        assert err < TOLERANCE[method] + 2 * torch.finfo(dtype).eps, (p, err.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_polar_is_scale_invariant_bit_for_bit(dtype):
    """Power-of-two scalings commute with rounding: polar(2^k G) == polar(G) exactly, also where the
    unscaled Frobenius norm would overflow (torch.optim.Muon returns zeros there) or underflow."""
    G = torch.randn(2, 24, 40)
    base = polar(G, dtype=dtype)
    for k in (-16, 30, 64, 100, 120):  # ||G||_F >= eps (below it Muon maps G to G / eps)
        assert torch.equal(polar(G * 2.0**k, dtype=dtype), base), k


def test_eigh_p0_on_subnormal_entries():
    """The issue's case: eigh with p = 0 on a matrix of float32 subnormals (Gram underflows to 0)."""
    G = torch.randn(64, 64) * 1e-41
    assert G.abs().max() < torch.finfo(torch.float32).smallest_normal
    O = spectral_power(G, 0.0, method="eigh")
    assert torch.isfinite(O).all()
    ref = _exact(G.double(), 0.0)
    # the input's subnormal rounding leaves ~2-3 significant digits per entry: the polar factor of it
    assert (O.double() - ref).norm() / ref.norm() < 1e-3


@pytest.mark.parametrize("method", ["svd", "eigh", "ns", "fast", "fast5", "auto"])
def test_htmuon_step_is_finite_at_extreme_gradient_scales(method):
    """The issue's reproduction, small: one HTMuon step from W = 0 with ||G||_F from 1e-30 to 1e30."""
    from htmuon import HTMuon

    G = torch.randn(32, 48)
    for scale in (1e-30, 1e-9, 1e12, 1e30):
        W = torch.nn.Parameter(torch.zeros(32, 48))
        W.grad = G / G.norm() * scale
        for p in (0.0, 0.125):
            HTMuon([W], lr=0.01, p=p, method=method).step()
            assert torch.isfinite(W).all(), (method, scale, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aminmax_reads_permuted_views_in_memory_order_with_the_same_result(dtype):
    """The finite checks and the plain-path decisions reduce a transposed view (how a tall matrix
    reaches the backends) through its contiguous permutation; every layout gives torch's answer,
    and NaN / Inf still reach the result wherever they sit."""
    from htmuon.functional import all_finite
    from htmuon.spectral import aminmax

    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 40, 24, generator=g).to(dtype)
    views = [
        base,
        base.mT,
        base.permute(2, 0, 1),
        base[:1].mT,  # a leading size-1 dimension
        base[:, ::2, :],  # not dense: reduced as it is
        base[0].T,
    ]
    for v in views:
        lo, hi = aminmax(v)
        ref_lo, ref_hi = torch.aminmax(v)
        assert lo.item() == ref_lo.item() and hi.item() == ref_hi.item()
        assert bool(all_finite(v))
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = base.clone()
        t[2, 39, 0] = bad
        for v in (t.mT, t.permute(1, 2, 0), t[2].T):
            assert not bool(all_finite(v))


def test_aminmax_of_a_transposed_view_makes_no_copy():
    """torch.aminmax of a non-contiguous CPU tensor copies it first (2.13); the helper must not."""
    from torch.profiler import ProfilerActivity, profile

    from htmuon.spectral import aminmax

    view = torch.randn(1, 48, 32).to(torch.bfloat16).mT

    def copies(fn) -> set[str]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(view)
        return {e.name for e in prof.events()} & {"aten::clone", "aten::contiguous", "aten::copy_"}

    if not copies(torch.aminmax):
        pytest.skip("this torch reduces a transposed view without copying it")
    assert not copies(aminmax)


def test_prescaled_polar_on_subnormal_input_is_finite(monkeypatch):
    """The prescaled path (accelerators and compiled steps take it always; CPU eager only for huge
    entries) on a matrix of subnormal float32 numbers: the power-of-two prescale is clamped to what
    float32 can represent, so the result is finite and equals the CPU path's (``G / eps`` here)."""
    import htmuon.spectral as S

    torch.manual_seed(0)
    G = torch.randn(8, 16) * 2.0**-140
    assert G.abs().max() < torch.finfo(torch.float32).tiny  # subnormal
    direct = polar(G, dtype=torch.float32)
    monkeypatch.setattr(S, "_cpu_polar", lambda *a, **k: None)
    prescaled = polar(G, dtype=torch.float32)
    assert torch.isfinite(prescaled).all() and prescaled.abs().max() > 0
    assert (prescaled - direct).norm() <= 1e-3 * direct.norm()


@pytest.mark.parametrize("paths", ["cpu", "accelerator"])
def test_polar_in_float16_work_is_the_polar_factor_at_any_scale(paths):
    """polar(G, dtype=torch.float16): on the CPU path the cast batch's Frobenius norm overflowed float16
    above 65504 (a zero result, as torch.optim.Muon's) and small entries were cast into float16's
    subnormals before the norm; now float16 work takes the exact prescale first, on every path, so the
    result is the same at every power-of-two scale (bit for bit) and close to the float32 iteration."""
    G = torch.randn(2, 24, 40)
    with accelerator_paths() if paths == "accelerator" else contextlib.nullcontext():
        base = polar(G, dtype=torch.float16)
        ref = polar(G, dtype=torch.float32)
        assert ((base.float() - ref).norm() / ref.norm()).item() < 1e-2
        for k in (-20, 10, 20, 60):
            assert torch.equal(polar(G * 2.0**k, dtype=torch.float16), base), k
