"""The code paths a GPU step takes, run on CPU (``htmuon.spectral.accelerator_paths``): same results as
the CPU paths, no host reads but the finite checks, and the batched pieces they are built from."""

from __future__ import annotations

import collections
import contextlib
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import needs_fullgraph_step, rel_err
from htmuon import HTMuon, polar
from htmuon import functional as F
from htmuon.spectral import accelerator_paths, host_path

SHAPES = [(48, 32), (48, 32), (32, 80), (48, 32), (3, 16, 24)]  # tall, wide, a 3-D batch; one bucket of 3


def _train(kw: dict, accelerator: bool, monkeypatch, steps: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """The updates of ``steps`` steps (weights minus initial weights); checks that the accelerator paths
    stacked same-shape matrices. With an ``interval``, the first matrix gets no gradient in the first
    step, so its schedule lags the others' and corrected and plain steps meet in one step."""
    seen = []
    direction = F.safe_direction

    def recording(mats, *args, **kwargs):
        seen.append(tuple(mats.shape))
        return direction(mats, *args, **kwargs)

    monkeypatch.setattr(F, "safe_direction", recording)
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    initial = [p.detach().clone() for p in params]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]
    opt = HTMuon(params, lr=0.02, weight_decay=0.1, **kw)
    with accelerator_paths() if accelerator else contextlib.nullcontext():
        for i, step in enumerate(grads):
            for j, (p, gr) in enumerate(zip(params, step)):
                p.grad = None if i == j == 0 and "interval" in kw else gr
            opt.step()
    assert any(s[0] >= 2 and s[1:] == (48, 32) for s in seen) == accelerator, seen
    return [p.detach() - w for p, w in zip(params, initial)]


def test_host_path_is_the_one_switch():
    cpu = torch.device("cpu")
    assert host_path(cpu) and not host_path(torch.device("meta"))
    with accelerator_paths():
        assert not host_path(cpu) and F.stacks_matrices(cpu)
        with accelerator_paths():  # nested: still on until the outer block ends
            pass
        assert not host_path(cpu)
    assert host_path(cpu)
    with pytest.raises(KeyError), accelerator_paths():
        raise KeyError("restored on the way out")
    assert host_path(cpu) and not F.stacks_matrices(cpu)


@pytest.mark.parametrize(
    "kw",
    [
        dict(p=0.0, method="ns"),
        dict(method="fast"),
        dict(method="fast5"),
        dict(method="eigh"),
        dict(method="svd"),
        dict(method="fast", interval=2),  # with a lagging schedule (see _train)
        dict(method="fast", plugin="normuon"),
        dict(method="fast", plugin="adamuon", lr_adjust="adamw_rms"),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_accelerator_paths_give_the_cpu_paths_result(kw, monkeypatch):
    """float32 work, so that the two paths differ only by the order of float32 roundings (measured up to
    9.5e-6 on the updates, AdaMuon; 0 for the exact backends and p = 0)."""
    kw = dict(kw, ns_dtype=torch.float32)
    if kw["method"] in ("eigh", "svd"):
        kw.pop("ns_dtype")
    cpu = _train(kw, False, monkeypatch)
    acc = _train(kw, True, monkeypatch)
    for a, b in zip(cpu, acc):
        assert rel_err(b, a) <= 1e-4


def test_accelerator_paths_in_bfloat16_stay_within_bfloat16_rounding(monkeypatch):
    cpu = _train(dict(method="fast", ns_dtype=torch.bfloat16), False, monkeypatch)
    acc = _train(dict(method="fast", ns_dtype=torch.bfloat16), True, monkeypatch)
    for a, b in zip(cpu, acc):
        assert rel_err(b, a) <= 2e-2  # measured 3.6e-3: bfloat16 roundings in another order (eps 7.8e-3)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("method", ["fast", "fast5"])
def test_accelerator_prescale_does_not_round_a_bfloat16_input_again(method, device):
    """A bfloat16 input (a bfloat16 momentum) is scaled by an exact power of two on the accelerator
    path, so its error against the exact map of that same input is the CPU path's, which takes it as it
    is. A prescale that rounds it again (e.g. by 1 / max |X_ij|) costs up to the error of rounding the
    input (on this heavy-tailed spectrum: `fast` 2.8% -> 4.9% at 512 x 1376, measured)."""
    from htmuon import spectral_power

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    g = torch.Generator().manual_seed(0)
    m, n = 128, 320
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
    s = torch.arange(1, m + 1, dtype=torch.float64).pow(-1.5)  # power law over three decades
    G16 = ((U * s) @ V.T * 3.7).bfloat16()  # a scale that is not a power of two
    u, sv, vh = torch.linalg.svd(G16.double(), full_matrices=False)
    ref = (u * sv.pow(0.125)) @ vh
    cpu = spectral_power(G16, 0.125, method=method, ns_dtype=torch.bfloat16)
    with accelerator_paths() if device == "cpu" else contextlib.nullcontext():  # a GPU takes that path
        acc = spectral_power(G16.to(device), 0.125, method=method, ns_dtype=torch.bfloat16).cpu()
    assert rel_err(acc, ref) <= 1.05 * rel_err(cpu, ref) + 1e-3, (rel_err(acc, ref), rel_err(cpu, ref))


def test_fast_backend_takes_one_matrix_and_extreme_values_on_the_accelerator_path():
    """A single (m, n) matrix runs the batched iteration too (as a compiled step may pass it); a float32
    matrix near the dtype's maximum stays finite also where subnormals are flushed to zero (its
    prescale factor 2^-e is kept a normal number)."""
    from htmuon.fast import fast_spectral_power

    X = torch.randn(8, 24, generator=torch.Generator().manual_seed(0))
    with accelerator_paths():
        one = fast_spectral_power(X, 0.125, ns_dtype=torch.float32)
        batch = fast_spectral_power(X[None], 0.125, ns_dtype=torch.float32)[0]
    assert one.shape == X.shape and rel_err(one, batch) <= 1e-6
    huge = X.sign() * torch.finfo(torch.float32).max * 0.99
    flushing = torch.set_flush_denormal(True)
    try:
        with accelerator_paths():
            out = fast_spectral_power(huge[None], 0.125, ns_dtype=torch.float32)
            polar_out = polar(huge, dtype=torch.float32)  # the same prescale (pow2_exponent)
    finally:
        torch.set_flush_denormal(False)
    if flushing:  # the CPU supports flushing (x86 does)
        for o in (out, polar_out):
            assert torch.isfinite(o).all() and o.abs().max() > 0


class _HostReads(TorchDispatchMode):
    """Counts reads of bool values on the host: on a GPU, each is a device synchronisation (the step
    counters are CPU tensors there, and are floats)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].dtype == torch.bool:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["fast", "ns"])
def test_accelerator_step_reads_the_host_only_for_its_finite_checks(method):
    """One read for the gradients (the foreach screen) and one per chunk (its direction's check)."""
    params = [nn.Parameter(torch.randn(s)) for s in SHAPES]
    budget = 2 * sum(F.chunk_work_bytes((1, 48, 32))) + 1  # the bucket of three 48 x 32: two chunks
    opt = HTMuon(params, method=method, chunk_bytes=budget)
    keys = [(F.matrix_shape(p.shape)[1:], p.dtype, p.device, True) for p in params]
    mshapes = [F.matrix_shape(p.shape) for p in params]
    plan = F.plan_step(keys, mshapes, [4] * len(params), budget)
    chunks = sum(len(w) for w in plan.windows)
    assert chunks == 4
    for p in params:
        p.grad = torch.randn_like(p)
    with accelerator_paths():
        opt.step()  # the state is created here
        with _HostReads() as mode:
            opt.step()
    assert mode.reads == 1 + chunks


@pytest.mark.parametrize("accelerator", [False, True], ids=["cpu-path", "accelerator-path"])
def test_finite_flags_are_exact_behind_the_screen(accelerator):
    ok = torch.ones(5)
    huge = torch.full((4, 4), 1e30)  # finite, but its 2-norm overflows float32: a false alarm, rechecked
    nan, inf = torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf"), 0.0])
    with accelerator_paths() if accelerator else contextlib.nullcontext():
        assert F.finite_flags([ok, huge]).tolist() == [True, True]
        assert F.finite_flags([ok, nan, huge, inf]).tolist() == [True, False, True, False]
        assert F.finite_flags([torch.zeros(0), ok.bfloat16()]).tolist() == [True, True]
        assert F.finite_flags([]).numel() == 0


@pytest.mark.parametrize("accelerator", [False, True], ids=["cpu-path", "accelerator-path"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_finds_every_nan_and_inf(dtype, accelerator):
    """Both paths' checks (an aminmax on CPU, one inf-norm reduction on accelerators): a NaN or +-Inf
    anywhere, in any layout, is found; the dtype's largest and smallest finite values are finite."""
    finfo = torch.finfo(dtype)
    with accelerator_paths() if accelerator else contextlib.nullcontext():
        base = torch.zeros(2, 6, 4, dtype=dtype)
        base[0, 0, 0], base[1, 5, 3], base[1, 2, 1] = finfo.max, -finfo.max, finfo.smallest_normal / 4
        for view in (base, base.mT, base[1]):
            assert bool(F.all_finite(view)) and F.is_finite(view)
        for bad in (float("nan"), float("inf"), float("-inf")):
            for idx in ((0, 0, 0), (1, 3, 2), (1, 5, 3)):
                t = base.clone()
                t[idx] = bad
                for view in (t, t.mT):
                    assert not bool(F.all_finite(view)) and not F.is_finite(view), (bad, idx)


def test_accelerator_step_refuses_a_nan_gradient_and_takes_an_overflowing_norm():
    params = [nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = HTMuon(params, method="fast")
    for p in params:
        p.grad = torch.randn_like(p)
    params[2].grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in params]
    with accelerator_paths():
        with pytest.raises(F.NonFiniteGradientError, match=r"\['params'\]\[2\] of shape \(32, 80\)"):
            opt.step()
        assert all(torch.equal(a, p) for a, p in zip(before, params)) and not opt.state
        params[2].grad = torch.full((32, 80), 1e30)  # finite; ||G||_F overflows float32
        opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert not torch.equal(before[2], params[2])


def test_stacked_momentum_directions_are_the_stacked_directions_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    shapes = [(16, 24), (2, 16, 24), (16, 24)]
    grads = [torch.randn(s, generator=g) for s in shapes]
    bufs = [torch.randn(s, generator=g) for s in shapes]
    grads[2] = torch.randn(24, 16, generator=g).T  # a transposed (non-contiguous) gradient
    before = [b.clone() for b in bufs]
    for nesterov in (True, False):
        got = F.stacked_momentum_directions(grads, bufs, 0.95, nesterov)
        want = torch.cat(
            [F.matrix_view(F.momentum_direction(gr, b, 0.95, nesterov)) for gr, b in zip(grads, bufs)]
        )
        assert got.shape == (4, 16, 24) and torch.equal(got, want)
        assert all(torch.equal(b, b0) for b, b0 in zip(bufs, before))  # the buffers are not changed
    # conv kernels flattened to out x (in * kh * kw), one channels_last; only 2-D items: one stack
    convs = [torch.randn(8, 3, 2, 2, generator=g) for _ in range(4)]
    convs[1] = convs[1].to(memory_format=torch.channels_last)
    cbufs = [torch.randn(8, 3, 2, 2, generator=g) for _ in range(4)]
    flat = [torch.randn(8, 12, generator=g) for _ in range(2)]
    for grads, bufs in ((convs, cbufs), (flat, [torch.randn(8, 12, generator=g) for _ in range(2)])):
        got = F.stacked_momentum_directions(grads, bufs, 0.9, True, batch_3d=False)
        want = torch.cat(
            [F.matrix_view(F.momentum_direction(gr, b, 0.9, True), False) for gr, b in zip(grads, bufs)]
        )
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="same-shape"):
        F.stacked_momentum_directions(
            [torch.zeros(4, 5), torch.zeros(5, 4)], [torch.zeros(4, 5)] * 2, 0.9, True
        )


def _step_operators(n: int, shape: tuple[int, ...] = (24, 40), **kw) -> list[str]:
    """The top-level operators of one accelerator-path step (the second) on ``n`` same-shape matrices."""
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(shape, generator=g)) for _ in range(n)]
    opt = HTMuon(params, lr=0.02, chunk_bytes=2**30, **kw)
    with accelerator_paths():
        for step in range(2):
            for p in params:
                p.grad = torch.randn(shape, generator=g)
            if step == 0:
                opt.step()
                continue
            with warnings.catch_warnings():  # torch 2.10.0 warns that only this cycle's events are kept
                warnings.filterwarnings("ignore", "Warning: Profiler clears events", UserWarning)
                with torch.profiler.profile() as prof:
                    opt.step()
    return [
        e.name
        for e in prof.events()
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    ]


@pytest.mark.parametrize(
    "kw", [{}, {"p": 0.0, "weight_decay": 0.1}, {"nesterov": False}, {"shape": (2, 24, 40)}]
)
def test_accelerator_step_operators_do_not_grow_with_the_number_of_matrices(kw):
    """On a GPU a step is bound by its operator launches (BENCHMARKS.md §A-7): the momentum of a chunk is
    built from two stacks and the updates are foreach calls, so a chunk of 8 matrices (2-D, or 3-D
    batches) dispatches the operators of a chunk of 2, but for reading each matrix's step counter (a
    CPU tensor: no launch)."""
    extra = collections.Counter(_step_operators(8, **kw)) - collections.Counter(_step_operators(2, **kw))
    assert extra == collections.Counter({"aten::item": 6}), extra


def _allocation_peak(fn) -> int:
    """The largest total of torch's CPU allocations while ``fn()`` runs, above what was held before."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    total = peak = 0
    for _, size in sorted(events):
        total += size
        peak = max(peak, total)
    return peak


@pytest.mark.parametrize("shape", [(64, 160), (160, 64), (96, 96), (3, 48, 80)])
@pytest.mark.parametrize(
    "kw",
    [
        {"ns_dtype": torch.bfloat16},
        {"ns_dtype": torch.float32},
        {"ns_dtype": torch.bfloat16, "method": "fast5", "p": 0.0},
        {"ns_dtype": torch.bfloat16, "interval": 2},  # a corrected and an in-between (polar) step
    ],
)
def test_the_plan_bounds_what_a_chunk_allocates(shape, kw):
    """chunk_work_bytes' model of the matmul-only backends (work_itemsize) is an upper bound of what a
    chunk of 3 matrices allocates on the accelerator path, over a whole step, and within 2x of it.
    oneDNN is off: its scratch buffers depend on the CPU's kernels, and a GPU has no such buffers."""
    kw = {"method": "fast", **kw}
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(shape, generator=g)) for _ in range(3)]
    opt = HTMuon(params, lr=0.01, chunk_bytes=2**40, **kw)
    mshape = F.matrix_shape(shape)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")  # the flags' own
        with accelerator_paths(), torch.backends.mkldnn.flags(enabled=False):
            _check_plan_bounds_three_steps(opt, params, shape, mshape, kw, g)


def _check_plan_bounds_three_steps(opt, params, shape, mshape, kw, g) -> None:
    group = opt.param_groups[0]
    for step in range(3):
        for p in params:
            p.grad = torch.randn(shape, generator=g)
        corrected = F.is_corrected(step + 1, group["interval"])
        work = F.work_itemsize(group, corrected, params[0])
        assert work == (2 if kw["ns_dtype"] == torch.bfloat16 else 4)
        planned = F.plan_step([0] * 3, [mshape] * 3, [4] * 3, 2**40, [work] * 3).peak_bytes
        measured = _allocation_peak(opt.step)
        if step:  # the first step also allocates the momentum buffers
            assert planned / 2 <= measured <= planned, (step, measured, planned)


@pytest.mark.parametrize("accelerator", [True, False], ids=["accelerator-path", "cpu-path"])
@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_a_step_of_several_windows_stays_within_its_plan(ns_dtype, accelerator):
    """A window's directions are freed before the next window is computed, so the step's peak is the
    plan's (the largest window), not two windows at once (it was 1.03x / 1.08x the plan on the
    accelerator path before). The CPU path stays well within its plan either way (it computes one
    matrix at a time): there this checks the bound only."""
    shapes = [(64, 160)] * 6 + [(96, 96)] * 4
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    budget = 3 * sum(F.chunk_work_bytes((1, 64, 160), 4, ns_dtype.itemsize))
    opt = HTMuon(params, lr=0.01, method="fast", ns_dtype=ns_dtype, chunk_bytes=budget)
    mshapes = [F.matrix_shape(s) for s in shapes]
    work = [F.work_itemsize(opt.param_groups[0], True, p) for p in params]
    plan = F.plan_step([m[1:] for m in mshapes], mshapes, [4] * len(shapes), budget, work)
    assert len(plan.windows) == 3
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")  # the flags' own
        with accelerator_paths() if accelerator else contextlib.nullcontext():
            with torch.backends.mkldnn.flags(enabled=False):
                peaks = []
                for _ in range(3):
                    for p in params:
                        p.grad = torch.randn(p.shape, generator=g)
                    peaks.append(_allocation_peak(opt.step))
    # steps 2 and 3 (the first also allocates the optimizer state, which stays)
    assert all(plan.peak_bytes / 2 <= m <= plan.peak_bytes for m in peaks[1:]), (peaks, plan.peak_bytes)


@pytest.mark.parametrize(
    "dtype, kw",
    [
        (torch.float64, {}),  # a prescaled float64 copy of the chunk, a float64 direction
        (torch.float16, {}),  # on CPU, two float32 temporaries of the chunk in the prescale
        (torch.bfloat16, {}),
        (torch.float32, {"p": 0.95}),  # the raw scale could overflow: prescaled copy, float32 direction
    ],
)
def test_maps_outside_the_model_are_planned_with_the_upper_estimate(dtype, kw):
    """Where the matmul model does not hold (a review measured up to 2.5x it), work_itemsize is None and
    the upper estimate bounds what the step allocates."""
    g = torch.Generator().manual_seed(0)
    shape = (64, 160)
    params = [nn.Parameter(torch.randn(shape, generator=g).to(dtype)) for _ in range(9)]
    opt = HTMuon(params, lr=0.01, method="fast", ns_dtype=torch.bfloat16, chunk_bytes=2**40, **kw)
    assert F.work_itemsize(opt.param_groups[0], True, params[0]) is None
    mshape = F.matrix_shape(shape)
    budget = 3 * sum(F.chunk_work_bytes(mshape, params[0].element_size()))  # windows of 3 directions
    opt.param_groups[0]["chunk_bytes"] = budget
    plan = F.plan_step([0] * 9, [mshape] * 9, [params[0].element_size()] * 9, budget)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")  # the flags' own
        with accelerator_paths(), torch.backends.mkldnn.flags(enabled=False):
            peaks = []
            for _ in range(2):
                for p in params:
                    p.grad = torch.randn(shape, generator=g).to(dtype)
                peaks.append(_allocation_peak(opt.step))
    # at least one direction in the parameters' dtype was allocated (the hook saw the step), at most the plan
    one = shape[0] * shape[1] * params[0].element_size()
    assert all(one <= m <= plan.peak_bytes for m in peaks), (peaks, one, plan.peak_bytes)


def test_work_itemsize_is_modelled_only_for_matmul_backends():
    p = nn.Parameter(torch.zeros(8, 8))
    group = HTMuon([p], method="fast", ns_dtype=torch.bfloat16).param_groups[0]
    assert F.work_itemsize(group, True, p) == 2
    assert F.work_itemsize({**group, "ns_dtype": torch.float32}, False, p) == 4  # polar in between
    for other in (
        {"method": "eigh"},
        {"method": "svd"},
        {"method": "ns"},
        {"plugin": "normuon"},
        {"scale": "muon_rms"},
        {"p": 1.0},
        {"p": 0.99},  # its raw scale could overflow float32 (for an 8 x 8 matrix: p above ~0.96)
    ):
        assert F.work_itemsize({**group, **other}, True, p) is None, other
    for dtype in (torch.float64, torch.float16, torch.bfloat16):  # modelled for float32 parameters only
        assert F.work_itemsize(group, True, nn.Parameter(torch.zeros(8, 8, dtype=dtype))) is None
    # the upper estimate is larger than the model, so a plan without work itemsizes stays valid
    assert sum(F.chunk_work_bytes((1, 768, 2048), 4, 4)) < sum(F.chunk_work_bytes((1, 768, 2048)))


def test_foreach_commit_and_update_equal_the_per_tensor_ones():
    g = torch.Generator().manual_seed(2)
    shapes = [(8, 12), (12, 8), (8, 12)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    dirs = [torch.randn(s, generator=g).bfloat16() for s in shapes]
    bufs = [torch.randn(s, generator=g) for s in shapes]
    b1, p1 = [b.clone() for b in bufs], [p.clone() for p in params]
    F.commit_momenta_(b1, grads, 0.95)
    F.decoupled_updates_(p1, dirs, 0.02, 0.1, [1.0, 1.5, 1.0])
    for b, p, gr, d, s, nb, np_ in zip(bufs, params, grads, dirs, [1.0, 1.5, 1.0], b1, p1):
        F.commit_momentum_(b, gr, 0.95)
        F.decoupled_update_(p, d, 0.02, 0.1, s)
        assert torch.equal(b, nb) and torch.equal(p, np_)
    # bfloat16 / float16 parameters (with float32, in one call): the decay multiplies as mul_ does. A
    # foreach multiply on CPU rounds 1 - lr wd to the parameters' dtype first (0.998 -> 0.99609375)
    for dtype in (torch.bfloat16, torch.float16):
        params = [torch.randn(64, 64, generator=g).to(dtype), torch.randn(64, 64, generator=g)]
        dirs = [torch.randn(64, 64, generator=g).to(dtype), torch.randn(64, 64, generator=g).bfloat16()]
        p1 = [p.clone() for p in params]
        F.decoupled_updates_(p1, dirs, 0.02, 0.1, [1.0, 1.0])
        for p, d, np_ in zip(params, dirs, p1):
            F.decoupled_update_(p, d, 0.02, 0.1, 1.0)
            assert torch.equal(p, np_), dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_is_the_simulated_one_and_syncs_only_for_its_checks(monkeypatch):
    """On a real GPU: the same updates as the accelerator paths on CPU (float32 work), the foreach
    screen refuses NaN and Inf and lets an overflowing norm through, and the only device
    synchronisations are the finite checks (``torch.cuda.set_sync_debug_mode``)."""
    import warnings

    kw = dict(method="fast", ns_dtype=torch.float32)
    cpu = _train(kw, True, monkeypatch)
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=g).cuda()) for s in SHAPES]
    initial = [p.detach().clone() for p in params]
    grads = [[torch.randn(s, generator=g).cuda() for s in SHAPES] for _ in range(4)]  # as _train
    opt = HTMuon(params, lr=0.02, weight_decay=0.1, **kw)
    for i, step in enumerate(grads):
        for p, gr in zip(params, step):
            p.grad = gr
        if i < 3:
            opt.step()
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1 + 3, [f"{w.filename}:{w.lineno}" for w in syncs]  # the screen; 3 buckets
    for a, p, w in zip(cpu, params, initial):
        assert rel_err((p.detach() - w).cpu(), a) <= 1e-4
    for bad in (float("nan"), float("inf")):
        params[1].grad = torch.randn(48, 32, device="cuda")
        params[1].grad[3, 4] = bad
        before = [p.detach().clone() for p in params]
        with pytest.raises(F.NonFiniteGradientError, match=r"\['params'\]\[1\]"):
            opt.step()
        assert all(torch.equal(a, p) for a, p in zip(before, params))
    params[1].grad = torch.full((48, 32), 1e30, device="cuda")
    opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in params)


def test_a_step_counter_set_as_a_number_keeps_counting():
    """The window's counters are advanced by one foreach add; a counter set by hand as a Python number
    (which the state check accepts) becomes the tensor form first."""
    p = nn.Parameter(torch.randn(8, 6))
    p.grad = torch.randn(8, 6)
    opt = HTMuon([p])
    opt.step()
    opt.state[p]["step"] = 5
    opt.step()
    assert isinstance(opt.state[p]["step"], torch.Tensor) and float(opt.state[p]["step"]) == 6.0


@pytest.mark.slow
@needs_fullgraph_step
def test_compiled_step_stacks_parameters_of_any_layout():
    """A compiled step stacks same-shape parameters like an accelerator; ``channels_last`` conv kernels
    and permuted 3-D parameters (``batch_3d=False``) need a copy to view as matrices, which ``out=``
    into the stack does not trace. Equal to the eager (CPU path) step."""
    import torch._dynamo

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    shapes = [(8, 4, 3, 3), (8, 4, 3, 3), (6, 5, 7), (6, 5, 7)]
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]

    def make():
        ps = [nn.Parameter(w.clone()) for w in init]
        ps[0].data = ps[0].data.contiguous(memory_format=torch.channels_last)
        ps[1].data = ps[1].data.contiguous(memory_format=torch.channels_last)
        ps[2].data = ps[2].data.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # non-contiguous 3-D
        return ps, HTMuon(ps, method="ns", batch_3d=False, ns_dtype=torch.float32)

    (pe, oe), (pc, oc) = make(), make()
    step = torch.compile(oc.step, backend="aot_eager", fullgraph=True)
    for gs in grads:
        for ps in (pe, pc):
            for p, gr in zip(ps, gs):
                p.grad = torch.empty_like(p).copy_(gr)  # the parameter's own layout, as autograd gives
        oe.step()
        step()
    for a, b in zip(pe, pc):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
