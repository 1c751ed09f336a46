"""HTMuon through the generic behaviours torch.optim's own suite checks of every optimizer.

torch ships the descriptions (``torch/testing/_internal/common_optimizers.py``: ``OptimizerInfo``,
``get_error_inputs_for_all_optims``, Muon's ``optim_error_inputs_func_muon``) but its harness needs
``expecttest`` and the test runner, so the checks are written out here, for Muon as HTMuon
(``p=0, method="ns"``) and for the default HTMuon. Like torch.optim.Muon's ``OptimizerInfo``:
no complex support (refused at step), no ``foreach``/``fused``/``capturable``/``differentiable``
or ``maximize`` flags (the AdamW part picks torch's foreach / fused kernel itself).
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from helpers import dtensor_api, needs_fullgraph_step, needs_torch_muon
from htmuon import HTMuon

VARIANTS = {"muon": dict(p=0.0, method="ns"), "default": {}}


@pytest.fixture(params=sorted(VARIANTS))
def kw(request):
    return dict(VARIANTS[request.param])


def make_params(seed=0):
    """Two matrices and a vector (the AdamW part), torch's usual small sizes."""
    g = torch.Generator().manual_seed(seed)
    return [
        nn.Parameter(torch.randn(10, 5, generator=g)),
        nn.Parameter(torch.randn(5, 5, generator=g)),
        nn.Parameter(torch.randn(5, generator=g)),
    ]


def grads_for(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def run(params, opt, steps, start=0):
    for t in range(start, start + steps):
        for p, g in zip(params, grads_for(params, t)):
            p.grad = g
        opt.step()


def assert_same_params(a, b, exact=True):
    for x, y in zip(a, b):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y)


# ------------------------------------------------------------------ error inputs (all optimizers + Muon)


def test_error_inputs_for_all_optims(kw):
    p1, p2 = nn.Parameter(torch.randn(1, 1)), nn.Parameter(torch.randn(1, 1))
    with pytest.raises(TypeError, match="params argument given to the optimizer should be an iterable"):
        HTMuon(p1, **kw)
    with pytest.warns(UserWarning, match="a parameter group with duplicate parameters"):
        HTMuon([p1, p1], **kw)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        HTMuon([{"params": p1}, {"params": p1}], **kw)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        HTMuon([p1], lr=torch.tensor([0.001, 0.001]), **kw)
    if _torch_takes_names():
        with pytest.raises(ValueError, match="all optimizer params should be with/without names"):
            HTMuon([("weight", p1), p2], **kw)
        with pytest.raises(ValueError, match="all optimizer param groups should be with/without names"):
            HTMuon([{"params": [("weight", p1)]}, {"params": [p2]}], **kw)
    else:  # torch < 2.6 takes no names: its own error (HTMuon's routing reads them itself, tested apart)
        with pytest.raises(
            TypeError, match="optimizer can only optimize Tensors, but one of the params is tuple"
        ):
            HTMuon([("weight", p1), p2], **kw)


def _torch_takes_names() -> bool:
    """Whether this torch's Optimizer takes ``(name, parameter)`` pairs (torch 2.6 on)."""
    try:
        torch.optim.SGD([("w", nn.Parameter(torch.zeros(1)))], lr=0.1)
    except TypeError:
        return False
    return True


def test_muon_error_inputs(kw):
    complex_param = torch.rand(2, 3, dtype=torch.complex64)
    complex_param.grad = torch.rand_like(complex_param)
    opt = HTMuon([complex_param], **kw)  # like Muon: refused at step
    with pytest.raises(RuntimeError, match="does not support complex parameters"):
        opt.step()
    with pytest.raises(ValueError, match="Invalid lr_adjust: 'arbitrary'"):
        HTMuon([nn.Parameter(torch.rand(2, 3))], lr_adjust="arbitrary", **kw)
    # Muon refuses non-2-D parameters; HTMuon routes them: 3-D is a batch, 1-D goes to AdamW
    params = [nn.Parameter(torch.rand(2, 3, 4)), nn.Parameter(torch.rand(4))]
    opt = HTMuon(params, **kw)
    for p in params:
        p.grad = torch.rand_like(p)
    opt.step()
    assert set(opt.state[params[0]]) == {"step", "momentum_buffer"}
    assert set(opt.state[params[1]]) == {"step", "exp_avg", "exp_avg_sq"}


# ------------------------------------------------------------------ tensor lr


def _torch_schedulers_take(lr: torch.Tensor) -> bool:
    """Whether torch's own schedulers drive torch's own optimizer with this tensor lr (torch 2.13 does
    for any 1-element shape; torch 2.5 only for a 0-d one)."""
    sgd = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr.clone())
    try:
        torch.optim.lr_scheduler.StepLR(sgd, step_size=1, gamma=0.5)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("dims", [0, 1, 2])
def test_tensor_lr(kw, dims):
    ref = make_params()
    opt_ref = HTMuon(ref, lr=0.01, **kw)
    run(ref, opt_ref, 3)
    lr = torch.tensor(0.01).reshape([1] * dims)
    params = make_params()
    opt = HTMuon(params, lr=lr, **kw)
    run(params, opt, 3)
    assert_same_params(params, ref)
    if not _torch_schedulers_take(lr):  # torch 2.5's schedulers fail on such an lr: on ours as on torch's
        with pytest.raises(RuntimeError, match="fill_ only supports 0-dimension value tensor"):
            torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # schedulers drive it too
    run(params, opt, 1, start=3)
    sched.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.005)


# ------------------------------------------------------------------ state dicts


def loaded_twin(params, opt, kw):
    """Copies of ``params`` and a fresh optimizer over them holding ``opt``'s state dict."""
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    opt_twin = HTMuon(twin, **kw)
    opt_twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    return twin, opt_twin


def test_state_dict_deterministic(kw):
    """Loaded into a fresh optimizer, the state continues exactly, and round-trips unchanged."""
    params = make_params()
    opt = HTMuon(params, **kw)
    run(params, opt, 2)
    twin, opt_twin = loaded_twin(params, opt, kw)
    sd, sd_twin = opt.state_dict(), opt_twin.state_dict()
    assert sd["param_groups"] == sd_twin["param_groups"]
    for pid in sd["state"]:
        for key, value in sd["state"][pid].items():
            assert torch.equal(value, sd_twin["state"][pid][key]), key
    run(params, opt, 2, start=2)
    run(twin, opt_twin, 2, start=2)
    assert_same_params(params, twin)


def test_state_dict_survives_torch_save_and_weights_only_load(kw):
    params = make_params()
    opt = HTMuon(params, **kw)
    run(params, opt, 2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    opt2 = HTMuon([nn.Parameter(p.detach().clone()) for p in params], **kw)
    opt2.load_state_dict(loaded)
    assert all(isinstance(s["step"], torch.Tensor) for s in opt2.state.values())


def test_load_nontensor_step(kw):
    """torch's test_load_nontensor_step: a state dict whose steps are Python numbers loads."""
    params = make_params()
    opt = HTMuon(params, **kw)
    run(params, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    for s in sd["state"].values():
        s["step"] = float(s["step"])
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    opt_twin = HTMuon(twin, **kw)
    opt_twin.load_state_dict(sd)
    run(params, opt, 1, start=2)
    run(twin, opt_twin, 1, start=2)
    assert_same_params(params, twin)


def test_a_step_count_set_as_a_number_steps_in_both_parts(kw):
    """A ``step`` that is a Python number in the live state (set by hand, or an old pickle; the step's
    checks accept it): the matrix part took it, but the AdamW part handed it to torch's AdamW kernel,
    which raised ("state_steps argument must contain a list of singleton tensors") after the matrices
    were updated. Both parts now take it as the counter's tensor form, as with tensor counters."""
    params = make_params()
    opt = HTMuon(params, **kw)
    run(params, opt, 2)
    twin, opt_twin = loaded_twin(params, opt, kw)
    for p in twin:
        opt_twin.state[p]["step"] = 2  # an int, in a matrix's state and in the vector's (AdamW part)
    run(params, opt, 1, start=2)
    run(twin, opt_twin, 1, start=2)
    assert_same_params(params, twin)
    for p in twin:
        step = opt_twin.state[p]["step"]
        assert isinstance(step, Tensor) and step.dtype == torch.float32 and float(step) == 3.0


def test_named_parameters_state_dict(kw):
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    opt = HTMuon(model.named_parameters(), **kw)
    # names known: routed by them as htmuon.param_groups would (no name marks an embedding or an output
    # head here: both weights get the spectral update, the biases AdamW), each group naming its own
    names = [g["param_names"] for g in opt.param_groups]
    assert [(g["algorithm"], g["param_names"]) for g in opt.param_groups] == [
        ("htmuon", ["0.weight", "1.weight"]),
        ("adamw", ["0.bias", "1.bias"]),
    ]
    named = dict(model.named_parameters())
    assert all(p is named[n] for g in opt.param_groups for p, n in zip(g["params"], g["param_names"]))
    model(torch.randn(2, 5)).sum().backward()
    opt.step()
    assert [g["param_names"] for g in opt.state_dict()["param_groups"]] == names
    twin = HTMuon(model.named_parameters(), **kw)
    twin.load_state_dict(opt.state_dict())
    assert [g["param_names"] for g in twin.param_groups] == names


# ------------------------------------------------------------------ hooks


def test_step_hooks(kw):
    params = make_params()
    opt = HTMuon(params, **kw)
    calls = []
    h1 = opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    h2 = opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    h3 = register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global_pre"))
    h4 = register_optimizer_step_post_hook(lambda o, a, k: calls.append("global_post"))
    try:
        run(params, opt, 2)
    finally:
        for h in (h1, h2, h3, h4):
            h.remove()
    assert calls == ["global_pre", "pre", "post", "global_post"] * 2
    run(params, opt, 1)
    assert len(calls) == 8


def test_state_dict_hooks(kw):
    params = make_params()
    opt = HTMuon(params, **kw)
    run(params, opt, 1)
    opt.register_state_dict_pre_hook(lambda o: o.__dict__.setdefault("_pre_called", True))

    def post(o, sd):
        sd["extra"] = 7
        return sd

    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert opt._pre_called and sd["extra"] == 7


def test_state_dict_post_hook_sees_the_dict_as_returned():
    """A state-dict post-hook post-processes the dict :meth:`HTMuon.state_dict` returns, whose dtype
    settings are names (what torch.distributed.checkpoint and JSON take). Before, the names were
    written after the hooks ran: a hook saw ``torch.float32`` (one writing the groups out as JSON
    failed). A dict a hook returns is the one returned."""
    params = make_params()
    opt = HTMuon(params, ns_dtype=torch.float32, compute_dtype=torch.float64)
    run(params, opt, 1)
    seen = []

    def post(o, sd):
        seen.append(
            json.dumps([{k: g[k] for k in ("ns_dtype", "compute_dtype")} for g in sd["param_groups"]])
        )
        return {**sd, "tag": "post"}  # a new dict, as a hook may return

    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert json.loads(seen[0])[0] == {"ns_dtype": "float32", "compute_dtype": "float64"}
    assert sd["tag"] == "post" and sd["param_groups"][0]["ns_dtype"] == "float32"


def test_load_state_dict_hooks(kw):
    """A pre-hook may rewrite the dict before it is checked (here: an old name of the momentum key);
    the post-hook sees the loaded optimizer."""
    params = make_params()
    opt = HTMuon(params, **kw)
    run(params, opt, 1)
    sd = copy.deepcopy(opt.state_dict())
    for s in sd["state"].values():
        if "momentum_buffer" in s:
            s["momentum"] = s.pop("momentum_buffer")

    def rename(o, state_dict):
        for s in state_dict["state"].values():
            if "momentum" in s:
                s["momentum_buffer"] = s.pop("momentum")
        return state_dict

    seen = []
    opt2 = HTMuon([nn.Parameter(p.detach().clone()) for p in params], **kw)
    with pytest.raises(ValueError, match="lacks \\['momentum_buffer'\\]"):
        opt2.load_state_dict(copy.deepcopy(sd))
    opt2.register_load_state_dict_pre_hook(rename)
    opt2.register_load_state_dict_post_hook(lambda o: seen.append(len(o.state)))
    opt2.load_state_dict(sd)
    assert seen == [3]
    assert "momentum_buffer" in opt2.state[opt2.param_groups[0]["params"][0]]


def test_load_state_dict_post_hook_sees_the_load_complete():
    """A load post-hook sees the optimizer as the load leaves it: dtype settings as ``torch.dtype``
    and step counters of its own. Before, single-process post-hooks ran inside torch's load, before
    htmuon's conversions: they read ``ns_dtype == "float32"`` (a string) and the caller's own step
    tensors (a hook counting in place changed the caller's dict); under a process group they ran
    after them."""
    params = make_params()
    opt = HTMuon(params, ns_dtype=torch.float32, compute_dtype=torch.float64)
    run(params, opt, 1)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["ns_dtype"] == "float32"  # written as a name
    seen = {}

    def post(o):
        seen["dtypes"] = (o.param_groups[0]["ns_dtype"], o.param_groups[0]["compute_dtype"])
        mine = [p for g in o.param_groups for p in g["params"]]  # in the state dict's numbering
        seen["shared"] = any(o.state[p]["step"] is sd["state"][i]["step"] for i, p in enumerate(mine))

    opt2 = HTMuon([nn.Parameter(p.detach().clone()) for p in params])
    opt2.register_load_state_dict_post_hook(post)
    opt2.load_state_dict(sd)
    assert seen == {"dtypes": (torch.float32, torch.float64), "shared": False}


# ------------------------------------------------------------------ copies


def test_deepcopy_and_pickle(kw):
    params = make_params()
    opt = HTMuon(params, **kw)
    run(params, opt, 2)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert type(clone) is HTMuon
        assert {k: v for k, v in clone.defaults.items() if k != "differentiable"} == opt.defaults
        cparams = clone.param_groups[0]["params"]
        assert all(c is not p and torch.equal(c, p) for c, p in zip(cparams, params))
        run(cparams, clone, 1, start=2)
    run(params, opt, 1, start=2)
    assert_same_params(params, cparams)
    assert "HTMuon (" in repr(opt)


def test_copies_route_added_groups_as_the_original():
    """deepcopy / pickle keep what torch.optim's ``__getstate__`` drops: how ``add_param_group`` routes
    (``routing``, ``adamw_lr``) and ``skipped_steps``. Before, a copy added the group unrouted (one
    ``"auto"`` group, norms at the matrix lr) and counted no skipped steps."""
    model = nn.ModuleDict({"embed": nn.Embedding(10, 4), "mlp": nn.Linear(4, 4)})
    opt = HTMuon(model.named_parameters(), lr=0.02, adamw_lr=1e-3, routing="paper")
    opt.skipped_steps.add_(2)
    for clone in (opt, copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        extra = nn.ModuleDict({"embed2": nn.Embedding(10, 4), "ln": nn.LayerNorm(4)})
        clone.add_param_group({"params": list(extra.named_parameters())})
        added = [(g["algorithm"], g["lr"], g["param_names"]) for g in clone.param_groups[2:]]
        assert added == [("htmuon", 0.02, ["embed2.weight"]), ("adamw", 1e-3, ["ln.weight", "ln.bias"])]
        assert int(clone.skipped_steps) == 2


def test_add_param_group_refused_by_the_dtensor_checks_adds_nothing(tmp_path):
    """add_param_group's promise (an error adds no group) held for routing and hyperparameters, not
    for the DTensor checks made after the groups were appended (a parameter sharded along two mesh
    dimensions: tensor parallelism): the group stayed, stepped without the distributed step.
    (A one-rank gloo group, in this process.)"""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed with gloo and no process group already initialised")
    Shard, _, distribute_tensor, init_device_mesh = dtensor_api()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        params = make_params()
        opt = HTMuon(params)
        before = [dict(g) for g in opt.param_groups]
        mesh = init_device_mesh("cpu", (1, 1))
        tp = nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(0), Shard(1)]))
        with pytest.raises(ValueError, match="sharded along mesh dimensions \\[0, 1\\]"):
            opt.add_param_group({"params": [tp]})
        assert opt.param_groups == before and opt._dist is None
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("other", ["adamw", pytest.param("muon", marks=needs_torch_muon)])
def test_loading_a_torch_optimizers_state_dict_says_so(kw, other):
    """A one-group torch.optim.AdamW / Muon state dict loaded by mistake is named as another optimizer's,
    not as a group-count mismatch with a hint about htmuon's routing changes; nothing changes."""
    params = make_params()
    opt = HTMuon(params, **kw)
    run(params, opt, 1)
    before = copy.deepcopy(opt.state_dict())
    foreign = torch.optim.AdamW(params) if other == "adamw" else torch.optim.Muon(params[:2])
    foreign.step()
    with pytest.raises(ValueError, match=r"^not an HTMuon state dict: loaded param group 0 lacks the keys"):
        opt.load_state_dict(foreign.state_dict())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][i][k], v) for i, s in before["state"].items() for k, v in s.items())


# ------------------------------------------------------------------ steps and gradients


def test_step_counts(kw):
    params = make_params()
    opt = HTMuon(params, **kw)
    run(params, opt, 3)
    params[1].grad = None  # a parameter without a gradient is not stepped (nor counted)
    params[0].grad = torch.randn(10, 5)
    params[2].grad = torch.randn(5)
    opt.step()
    assert [int(opt.state[p]["step"]) for p in params] == [4, 3, 4]
    assert all(opt.state[p]["step"].dtype == torch.float32 for p in params)


def test_step_is_noop_when_params_have_no_grad(kw):
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = HTMuon(params, weight_decay=0.1, **kw)
    opt.step()
    assert_same_params(params, before)
    assert len(opt.state) == 0


def test_step_is_noop_for_zero_grads(kw):
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = HTMuon(params, **kw)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert_same_params(params, before)
    assert all(int(opt.state[p]["step"]) == 1 for p in params)


def test_zero_grad_and_non_empty_state(kw):
    params = make_params()
    opt = HTMuon(params, **kw)
    run(params, opt, 1)
    assert all(opt.state[p] for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.zero_grad(set_to_none=False)


def test_param_groups_lr_and_weight_decay(kw):
    """Per-group lr / weight decay, and a group added later, as torch's test_param_groups_* check."""
    params = make_params()
    opt = HTMuon([{"params": params[:1], "lr": 0.0}, {"params": params[1:], "weight_decay": 0.5}], **kw)
    extra = nn.Parameter(torch.randn(3, 3))
    opt.add_param_group({"params": [extra], "lr": 0.1})
    before = [p.detach().clone() for p in (*params, extra)]
    for p in (*params, extra):
        p.grad = torch.randn_like(p)
    opt.step()
    assert torch.equal(params[0], before[0])  # lr 0
    assert not torch.equal(params[1], before[1]) and not torch.equal(extra, before[3])
    assert opt.param_groups[1]["weight_decay"] == 0.5 and opt.param_groups[2]["p"] == opt.defaults["p"]
    # as torch.optim: one group, a dict (a list of tensors or of groups was added as groups)
    count = len(opt.param_groups)
    for not_a_group in ([nn.Parameter(torch.randn(3, 3))], [{"params": [nn.Parameter(torch.randn(3, 3))]}]):
        with pytest.raises(TypeError, match=r"^param_group must be a dict, but got <class 'list'>$"):
            opt.add_param_group(not_a_group)
    assert len(opt.param_groups) == count


def test_goes_right_direction_with_scheduler(kw):
    """torch's test_forloop_goes_right_direction / ..._with_lrscheduler: a least-squares problem."""
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(4, 6))
    b = nn.Parameter(torch.randn(4))
    X, Y = torch.randn(32, 6), torch.randn(32, 4)
    opt = HTMuon([W, b], lr=0.02, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)

    def loss():
        return (X @ W.T + b - Y).square().mean()

    first = loss().item()
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
        sched.step()
    assert loss().item() < first


@pytest.mark.parametrize("method", ["fast", "fast5", "eigh", "svd", "ns"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_step_inside_autocast_is_the_step_outside(method, dtype):
    """A whole training loop under ``torch.autocast`` calls ``step`` inside it. The step runs with autocast
    off, as torch.optim's elementwise steps are unaffected by it: before, float16 autocast made the
    bfloat16 ``fast`` products fail on mixed operands and bfloat16 autocast rounded the exact backends'
    products."""

    def run(inside: bool) -> Tensor:
        g = torch.Generator().manual_seed(3)
        w = nn.Parameter(torch.randn(24, 40, generator=g))
        b = nn.Parameter(torch.randn(40, generator=g))
        opt = HTMuon([w, b], lr=0.02, method=method, adamw_lr=1e-3)
        for _ in range(2):
            w.grad, b.grad = torch.randn(24, 40, generator=g), torch.randn(40, generator=g)
            with torch.autocast("cpu", dtype=dtype, enabled=inside):
                opt.step()
                assert torch.is_autocast_enabled("cpu") == inside  # the caller's autocast is restored
        return torch.cat([w.detach().flatten(), b.detach()])

    assert torch.equal(run(True), run(False))


@pytest.mark.parametrize("method", ["auto", "eigh", "svd", "fast5", "ns"])
def test_meta_parameters_step_with_the_finite_check_on(method):
    """Parameters on the meta device (shape-only dry runs) step as torch.optim's do: the finite checks
    and the exact backends' checks, which read values, are skipped there."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    opt = HTMuon(model.named_parameters(), lr=0.02, adamw_lr=1e-3, method=method)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(int(s["step"]) == 1 for s in opt.state.values()) and len(opt.state) == 6


def test_grad_scaler_skips_an_inf_step_and_otherwise_equals_the_unscaled_loop():
    """``torch.amp.GradScaler``: ``scaler.step(opt)`` unscales the gradients (a power of two: exact),
    skips the step whose gradients hold an Inf (HTMuon's own check never sees it) and halves the
    scale; the other steps equal a loop without the scaler that skips the same step itself."""

    def run(scaled: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
        opt = HTMuon(model.named_parameters(), lr=0.02, adamw_lr=1e-3)
        scaler = torch.amp.GradScaler("cpu", enabled=scaled)
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            x = torch.randn(5, 8, generator=g)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x).float().pow(2).mean()
            scaler.scale(loss).backward()
            if step == 1:
                model[0].weight.grad[0, 0] = float("inf")
                if not scaled:
                    continue  # the reference skips this step itself
            scaler.step(opt)
            scaler.update()
        return model, opt, scaler

    model, opt, scaler = run(True)
    ref, ref_opt, _ = run(False)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert {int(s["step"]) for s in opt.state.values()} == {3}
    assert scaler.get_scale() == 2.0**15  # halved once, at the Inf step
    assert int(opt.skipped_steps) == 0


@needs_fullgraph_step
def test_compiled_step_inside_autocast_is_one_graph_and_the_eager_step():
    """``torch.compile(opt.step, fullgraph=True)`` called inside ``torch.autocast``: the step's own
    autocast-off blocks trace (an ExitStack of them did not), and it equals the eager step."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    def run(compiled: bool) -> Tensor:
        g = torch.Generator().manual_seed(4)
        w = nn.Parameter(torch.randn(16, 12, generator=g))
        b = nn.Parameter(torch.randn(12, generator=g))
        opt = HTMuon([w, b], lr=0.02, method="ns", adamw_lr=1e-3)
        step = torch.compile(opt.step, backend="eager", fullgraph=True) if compiled else opt.step
        for _ in range(3):
            w.grad, b.grad = torch.randn(16, 12, generator=g), torch.randn(12, generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                step()
        return torch.cat([w.detach().flatten(), b.detach()])

    torch._dynamo.reset()
    counters.clear()
    torch.testing.assert_close(run(True), run(False), rtol=1e-6, atol=1e-7)
    # traced (not run eagerly), one graph after the state-creating first step, no recompile as it runs
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_float16_adamw_part_is_computed_in_float32_as_torchs_fused_kernel():
    """torch's for-loop and foreach AdamW compute a float16 parameter's update in float16, where eps
    and the square of a gradient of 1e-4 round to 0: ``torch.optim.AdamW`` sets such a parameter to
    -inf, and HTMuon's AdamW part (the same kernels) did too. It is computed in float32 now, state kept
    in float16, as torch's fused kernel does: the same values to float16's rounding, eager and in the
    masked math of compiled steps."""
    from htmuon import functional as F

    plain = nn.Parameter(torch.zeros(4, dtype=torch.float16))
    plain.grad = torch.full((4,), 1e-4, dtype=torch.float16)
    torch.optim.AdamW([plain], lr=0.02, foreach=False).step()  # (its for-loop kernel, whatever the default)
    assert not plain.isfinite().any()  # what was wrong (torch's unfused kernel)
    grads = [torch.full((4,), 1e-4 * (k + 1), dtype=torch.float16) for k in range(3)]
    b = nn.Parameter(torch.zeros(4, dtype=torch.float16))
    W = nn.Parameter(torch.randn(8, 8, dtype=torch.float16))
    opt = HTMuon([W, b], lr=0.02, weight_decay=0.1)
    for g in grads:
        W.grad, b.grad = torch.randn(8, 8, dtype=torch.float16), g.clone()
        opt.step()
    assert b.isfinite().all() and opt.state[b]["exp_avg_sq"].dtype == torch.float16
    hyper = dict(lr=0.02, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.1)
    p32, m32, v32 = (torch.zeros(4) for _ in range(3))
    eager, masked = [nn.Parameter(torch.zeros(4, dtype=torch.float16)) for _ in range(2)]
    state = {id(p): (torch.zeros_like(p), torch.zeros_like(p), torch.zeros(())) for p in (eager, masked)}
    for step, g in enumerate(grads, 1):  # float32 math on float16-rounded state: the reference, by hand
        m32, v32 = m32.lerp(g.float(), 0.1), v32 * 0.95 + 0.05 * g.float() ** 2
        denom = v32.sqrt() / (1 - 0.95**step) ** 0.5 + 1e-10
        p32 = (p32 * (1 - 0.02 * 0.1) - 0.02 / (1 - 0.9**step) * m32 / denom).half().float()
        m32, v32 = m32.half().float(), v32.half().float()  # (kept in float16)
        for p, run in ((eager, F.adamw), (masked, F.adamw_masked)):
            m, v, t = state[id(p)]
            extra = (torch.tensor(True),) if run is F.adamw_masked else ()
            run([p.data], [g], [m], [v], [t], *extra, **hyper)
    for p in (b, eager, masked):
        torch.testing.assert_close(p.detach().float(), p32, rtol=2e-3, atol=1e-6)


def test_float16_adamw_part_splits_a_mixed_list_in_one_pass(monkeypatch):
    """The float16 / other split of the AdamW part's parameters built a set of the float16 indices for
    every parameter (quadratic Python work in each step: ~2 ms for 300 parameters, half float16, as in a
    half model with float32 norms); the float32 parameters are still updated as torch's AdamW does."""
    from htmuon import functional as F

    made = []
    monkeypatch.setattr(F, "set", lambda *a: made.append(1) or set(*a), raising=False)
    params = [torch.zeros(3, dtype=torch.float16 if k % 2 else torch.float32) for k in range(40)]
    grads = [torch.full_like(p, 1e-2) for p in params]
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    F.adamw(
        params,
        grads,
        *state,
        [torch.zeros(()) for _ in params],
        lr=0.1,
        betas=(0.9, 0.95),
        eps=1e-10,
        weight_decay=0.0,
    )
    assert len(made) <= 1, len(made)
    ref = torch.zeros(3)
    ref.grad = torch.full_like(ref, 1e-2)
    torch.optim.AdamW([ref], lr=0.1, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0).step()
    assert all(torch.equal(p.float(), ref) or p.dtype == torch.float16 for p in params)
    assert all(p.float().allclose(ref, rtol=1e-3) for p in params)
