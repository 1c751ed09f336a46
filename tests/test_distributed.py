"""Distributed HTMuon: owner assignment and shard layouts (in process), and parity of DDP and FSDP2 with
the single-process optimizer (2 CPU processes, gloo; tests/dist_worker.py runs every scenario once)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import htmuon
from htmuon import functional as F
from htmuon.distributed import (
    ShardLayout,
    assign_owners,
    matrix_cost,
    matrix_shape,
    plan_owned_windows,
    plan_replicated_step,
    setup,
    step_signature,
)
from htmuon.optim import matrix_view
from htmuon.torchrun import list_elements_innermost_first

HERE = Path(__file__).resolve().parent
distributed = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)
WORLD = 2
#: End-to-end runs average the ranks' gradients (DDP all-reduce, FSDP2 reduce-scatter) where the
#: single process averages over the global batch at once: same math, other float32 rounding, which
#: the iterative backends amplify by a factor that depends on the CPU (measured after 3 steps on
#: parameters of size ~0.5, lr 0.02: DDP with eigh 3.3e-7 on an AVX2 CPU and 1.6e-7 on an AMD EPYC
#: with AVX-512-BF16; FSDP2 and htmuon.torchrun with the `ns` backend 7.0e-7 and 4.6e-6). A wrong
#: owner, a lost exchange or a missing average moves parameters by ~lr = 2e-2.
TRAINING_TOL = 5e-5


# ------------------------------------------------------------------------------- in process


def test_assign_owners_is_greedy_lpt_and_deterministic():
    assert assign_owners([4, 3, 3, 2], 2) == [0, 1, 1, 0]
    assert assign_owners([], 3) == []
    assert assign_owners([5.0], 4) == [0]
    costs = [matrix_cost(matrix_shape(s)) for s in [(512, 512)] * 4 + [(1376, 512)] * 3 + [(32000, 512)]]
    owners = assign_owners(costs, 2)
    assert owners == assign_owners(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert max(loads) <= sum(costs) / 2 + max(costs)  # LPT never exceeds the mean load by the largest job
    with pytest.raises(ValueError, match="world size: 0"):
        assign_owners([1.0], 0)


def test_owners_are_chosen_for_the_whole_step_and_every_window_keeps_every_rank_busy():
    """Equal matrices, one per rank and window (a tiny budget): each window has one matrix per rank,
    while per-window owners gave every window of one matrix to rank 0."""
    shapes = [(1, 256, 256)] * 6
    plan, owners = plan_owned_windows(["k"] * 6, shapes, [4] * 6, 1, 3)
    assert sorted(owners) == [0, 0, 1, 1, 2, 2]
    assert len(plan.windows) == 2
    for window in plan.windows:
        assert len(window) == 3 and sorted(owners[chunk[0]] for chunk in window) == [0, 1, 2]
        assert all(len({owners[i] for i in chunk}) == 1 for chunk in window)  # a chunk is one rank's
    assert sorted(i for w in plan.windows for c in w for i in c) == list(range(6))
    # LLaMA-60M's matrices (q, k, v, o, gate, up, down x 8 blocks) with the default budget on 2 and 4
    # ranks: every window gives every rank work, and the step's cost is split within 10% of even
    blocks = [(1, 512, 512)] * 4 + [(1, 1376, 512)] * 2 + [(1, 512, 1376)]
    shapes = blocks * 8
    for world in (2, 4):
        plan, owners = plan_owned_windows(
            [s[1:] for s in shapes], shapes, [4] * len(shapes), F.DEFAULT_CHUNK_BYTES, world
        )
        loads = [sum(matrix_cost(s) for s, o in zip(shapes, owners) if o == r) for r in range(world)]
        assert max(loads) <= 1.1 * sum(loads) / world, loads
        for window in plan.windows[:-1]:
            assert {owners[c[0]] for c in window} == set(range(world)), window
    # one rank: the single-process plan
    plan, owners = plan_owned_windows(["k"] * 3, [(1, 8, 8)] * 3, [4] * 3, 2**20, 1)
    assert owners == [0, 0, 0] and plan == F.plan_step(["k"] * 3, [(1, 8, 8)] * 3, [4] * 3, 2**20)


def test_step_signatures_name_the_part_that_differs():
    """The refusal of a step that differs between ranks names what differs: one checksum per part,
    compared as the element-wise min and max over the ranks (what the step's all_reduce gives)."""
    from htmuon.distributed import SIGNATURE_PARTS, signature_difference, step_signatures

    a, b = torch.zeros(4, 4), torch.zeros(4)

    def groups(params=(a, b), **kw):
        settings = {"chunk_bytes": 64, "batch_3d": True, "interval": 1, "plugin": None, **kw}
        return [{"params": list(params), **settings}]

    def difference(*ranks):
        vectors = [[sum(len(g["params"]) for g in r), *step_signatures(r)] for r in ranks]
        return signature_difference([min(v) for v in zip(*vectors)], [max(v) for v in zip(*vectors)])

    base = step_signatures(groups())
    assert len(base) == len(SIGNATURE_PARTS) and base == step_signatures(groups())
    assert difference(groups(), groups()) == []
    changed = {
        "shapes": groups(params=[torch.zeros(4, 5), b]),
        "dtypes": groups(params=[torch.zeros(4, 4, dtype=torch.bfloat16), b]),
        "chunk_bytes": groups(chunk_bytes=65),
        "batch_3d": groups(batch_3d=False),
        "interval": groups(interval=5),
        "plugin": groups(plugin="normuon"),
    }
    for part, other in changed.items():
        assert difference(groups(), other) == [part]
        assert difference(groups(), groups(), other) == [part]  # three ranks, one differs
    assert difference(groups(), groups(chunk_bytes=65, plugin="normuon")) == ["chunk_bytes", "plugin"]
    # the same parameters in other groups (a rank built one more group, or an empty one): the groups
    split = groups(params=[a]) + groups(params=[b])
    assert difference(groups(), split) == ["the parameter groups (their number or sizes)"]
    assert difference(groups(), groups() + groups(params=[])) == [
        "the parameter groups (their number or sizes)"
    ]
    assert difference(groups(), groups(params=[a, b, torch.zeros(3)])) == ["the number of parameters"]


def test_step_signatures_compare_every_setting_and_what_auto_resolves_to(monkeypatch):
    """Every hyperparameter of a group is compared (those that size the collectives: a rank that
    differs aborted gloo or hung; and those of the math: the replicas drifted apart), and what this rank
    resolves method='auto' / ns_dtype='auto' to (a node with another CPU: 'fast' + bfloat16 where
    bfloat16 matmuls are fast, 'eigh' elsewhere), by name; the refusal then says to pass them."""
    from htmuon.distributed import SIGNATURE_SETTINGS, signature_difference, step_signatures

    a, b = torch.zeros(4, 4), torch.zeros(4)
    base = dict(htmuon.HTMuon([torch.nn.Parameter(a.clone())]).param_groups[0], params=[a, b])

    def difference(*ranks):
        vectors = [[sum(len(g["params"]) for g in r), *step_signatures(r)] for r in ranks]
        return signature_difference([min(v) for v in zip(*vectors)], [max(v) for v in zip(*vectors)])

    changed = {
        "chunk_bytes": 64,
        "batch_3d": False,
        "interval": 2,
        "plugin": "normuon",
        "compute_dtype": torch.float64,
        "method": "svd",
        "ns_dtype": torch.bfloat16,
        "ns_steps": 6,
        "p": 0.5,
        "spectrum": "rank",
        "scale": "muon_rms",
        "lr": 0.05,
        "weight_decay": 0.1,
        "momentum": 0.9,
        "nesterov": False,
        "lr_adjust": "adamw_rms",
        "beta2": 0.9,
        "plugin_eps": 1e-8,
        "adamw_betas": (0.9, 0.99),
        "adamw_eps": 1e-8,
        "algorithm": "adamw",
        "check_finite": False,
    }
    assert set(changed) == set(SIGNATURE_SETTINGS)
    for key, value in changed.items():
        assert difference([base], [{**base, key: value}]) == [key], key
    # the same value in another form is the same: 0 and 0.0, a 1-element tensor lr and its value (a
    # float32 tensor of 0.02 holds another number, with which the step computes: it differs)
    lr64 = torch.tensor([0.02], dtype=torch.float64)
    assert difference([base], [{**base, "weight_decay": 0}], [{**base, "lr": lr64}]) == []
    assert difference([base], [{**base, "lr": torch.tensor(0.02)}]) == ["lr"]
    assert difference([{**base, "lr": torch.tensor(0.02)}], [{**base, "lr": torch.tensor(0.03)}]) == ["lr"]
    # invalid settings (refused by the step's own check on that rank) give a checksum, not an error
    for key, value in (("method", "bogus"), ("lr", torch.tensor([1.0, 2.0])), ("ns_dtype", "bogus")):
        assert difference([base], [{**base, key: value}]) == [key]
    # another CPU: method='auto' resolves to another backend and working dtype, named as such
    monkeypatch.setenv("HTMUON_CPU_BF16", "0")
    eigh = step_signatures([base])
    monkeypatch.setenv("HTMUON_CPU_BF16", "1")
    vectors = [[2, *eigh], [2, *step_signatures([base])]]
    differ = signature_difference([min(v) for v in zip(*vectors)], [max(v) for v in zip(*vectors)])
    assert (
        len(differ) == 2
        and "pass method= explicitly" in differ[0]
        and "pass ns_dtype= explicitly" in differ[1]
    )
    # ... but not where this rank runs no such choice: an explicit exact backend, an AdamW group
    for group in ({**base, "method": "eigh"}, {**base, "algorithm": "adamw"}):
        mine = step_signatures([group])
        monkeypatch.setenv("HTMUON_CPU_BF16", "0")
        assert step_signatures([group]) == mine
        monkeypatch.setenv("HTMUON_CPU_BF16", "1")


def test_step_signature_sees_shapes_dtypes_and_the_settings_that_shape_collectives():
    def groups(shape=(4, 5), dtype=torch.float32, **kw):
        return [{"params": [torch.zeros(3, 3), torch.zeros(shape, dtype=dtype)], "chunk_bytes": 8, **kw}]

    base = step_signature(groups())
    assert base == step_signature(groups())  # deterministic (not Python's per-process str hash)
    assert base != step_signature(groups(shape=(5, 4)))
    assert base != step_signature(groups(dtype=torch.bfloat16))
    assert base != step_signature([{**groups()[0], "chunk_bytes": 9}])
    # "auto" is compared by what it resolves to on the group's device (32 MiB on CPU)
    auto = step_signature([{**groups()[0], "chunk_bytes": "auto"}])
    assert auto == step_signature([{**groups()[0], "chunk_bytes": F.DEFAULT_CHUNK_BYTES}]) != base
    meta = [{**groups()[0], "chunk_bytes": "auto", "params": [torch.zeros(3, 3, device="meta")]}]
    assert step_signature(meta) == step_signature([{**meta[0], "chunk_bytes": F.ACCELERATOR_CHUNK_BYTES}])
    assert base != step_signature([{**groups()[0], "params": groups()[0]["params"][:1]}])
    # the group settings that change which collectives a step runs (a rank that differs would hang)
    settled = groups(batch_3d=True, interval=1, plugin=None)
    for key, value in (("interval", 2), ("plugin", "normuon"), ("batch_3d", False)):
        assert step_signature(settled) != step_signature([{**settled[0], key: value}]), key


def test_every_matrix_is_in_one_window_when_ranks_own_different_numbers_of_windows():
    """3 equal matrices on 2 ranks, one per window: rank 0 owns 2 windows' worth, rank 1 one; the
    last window has rank 0's matrix alone, and no matrix is left out (or stepped twice)."""
    plan, owners = plan_owned_windows(["k"] * 3, [(1, 256, 256)] * 3, [4] * 3, 1, 2)
    assert sorted(owners) == [0, 0, 1]
    assert sorted(i for w in plan.windows for c in w for i in c) == [0, 1, 2]
    assert len(plan.windows) == 2 and sorted(len(w) for w in plan.windows) == [1, 2]


def test_replicated_step_gives_each_rank_its_share_of_the_budget():
    """DDP: every rank holds the whole window's directions, so each plans within chunk_bytes / world."""
    shapes = [(1, 256, 256)] * 8
    two = 2 * sum(F.chunk_work_bytes(shapes[0]))  # room for two matrices' work and directions
    plan, owners = plan_replicated_step(["k"] * 8, shapes, [4] * 8, 2 * two, 2)
    assert (plan, owners) == plan_owned_windows(["k"] * 8, shapes, [4] * 8, two, 2)
    assert [[len(c) for c in w] for w in plan.windows] == [[2, 2], [2, 2]]  # 2 matrices per rank and window
    assert plan != plan_owned_windows(["k"] * 8, shapes, [4] * 8, 2 * two, 2)[0]  # the whole budget each


def test_fsdp_wrap_order_puts_nested_lists_first():
    """fully_shard needs children before parents: a block's experts before the block."""

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])

    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([Block(), Block()])
    order = list_elements_innermost_first(model)
    b0, b1 = model.blocks
    assert order == [*b0.experts, *b1.experts, b0, b1]
    shared = torch.nn.Linear(2, 2)
    model.more = torch.nn.ModuleList([shared, shared])
    assert list_elements_innermost_first(model).count(shared) == 1


def test_assign_owners_balances_cost_not_count():
    # one big matrix and eight small ones: by count each rank would get 4-5; by cost the big one is
    # alone on a rank.
    costs = [matrix_cost((1, 4096, 4096))] + [matrix_cost((1, 64, 64))] * 8
    owners = assign_owners(costs, 2)
    assert owners[0] == 0 and owners[1:] == [1] * 8


@pytest.mark.parametrize("size", [0, 1, 2, 3, 7, 8])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_layout_matches_torch_chunk(size, world):
    x = torch.arange(size * 5).reshape(size, 5)
    layout = ShardLayout((size, 5), 0, world)
    chunks = list(torch.chunk(x, world)) if size else []
    for rank in range(world):
        want = chunks[rank] if rank < len(chunks) else x[:0]
        assert torch.equal(x[layout.index(rank)], want)
        assert layout.local_shape(rank) == tuple(want.shape)
    assert sum(layout.numel(r) for r in range(world)) == x.numel()
    replicated = ShardLayout((size, 5), None, world)
    assert replicated.local_shape(1) == (size, 5) and replicated.sends(1, 0) is False


@pytest.mark.parametrize(
    ("shape", "batch_3d", "want"),
    [
        ((3, 4), True, (1, 3, 4)),
        ((2, 3, 4), True, (2, 3, 4)),
        ((2, 3, 4), False, (1, 2, 12)),
        ((5, 3, 3, 3), True, (1, 5, 27)),
    ],
)
def test_matrix_shape_and_matrix_view(shape, batch_3d, want):
    """The matrix-batch rule, and matrix_view is a view: in-place updates reach the parameter."""
    assert matrix_shape(shape, batch_3d) == want
    t = torch.zeros(shape).mT if len(shape) == 2 else torch.zeros(shape)  # non-contiguous 2-D too
    v = matrix_view(t, batch_3d)
    assert tuple(v.shape) == (want if len(shape) != 2 else (1, *t.shape))
    v.add_(1.0)
    assert bool((t == 1.0).all())


def test_single_process_path_is_untouched():
    model = torch.nn.Linear(8, 4)
    opt = htmuon.HTMuon(model.parameters())
    assert opt._dist is None and setup(opt.param_groups, None) is None
    model(torch.randn(2, 8)).square().sum().backward()
    opt.step()
    assert opt._dist is None and set(opt.state[model.weight]) == {"step", "momentum_buffer"}


def test_process_group_without_init_process_group_is_a_clear_error():
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # pragma: no cover
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(ValueError, match="not initialised"):
        htmuon.HTMuon(torch.nn.Linear(4, 4).parameters(), process_group="world")


# ------------------------------------------------------------------------------- 2 processes


def _launch(
    out_dir: Path, *scenarios: str, timeout_s: int | None = None, world: int = WORLD, env: dict | None = None
) -> dict[str, dict]:
    env = {**os.environ, **(env or {})}
    if timeout_s is not None:  # the process group's timeout: a collective that would hang fails then
        env["HTMUON_TEST_DIST_TIMEOUT"] = str(timeout_s)
    src = str(Path(htmuon.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    rendezvous = out_dir / "rendezvous"
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "dist_worker.py"), str(r), str(world), str(rendezvous), str(out_dir)]
            + list(scenarios),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=600))
        except subprocess.TimeoutExpired:  # pragma: no cover
            for p in procs:
                p.kill()
            pytest.fail("distributed worker timed out after 600 s")
    failed = [(r, p.returncode, outputs[r][1]) for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        report = "\n".join(f"--- rank {r} exited {rc}; stderr:\n{err[-6000:]}" for r, rc, err in failed)
        pytest.fail(f"distributed worker failed:\n{report}")
    return {r: _Results(json.loads((out_dir / f"rank{r}.json").read_text())) for r in range(world)}


class _Results(dict):
    """One rank's results; a scenario the worker skipped (FSDP2 on CPUs before torch 2.9) skips its
    test."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if isinstance(value, str) and value.startswith("skipped: "):
            pytest.skip(value.removeprefix("skipped: "))
        return value


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """The worker's on-request scenarios (dist_worker.ON_REQUEST), each in a launch of its own with a
    120 s process-group timeout: where a step would hang, its collective fails after 120 s instead (and
    an abort fails only that scenario's test)."""
    cache: dict[str, list[dict] | str] = {}

    def run(scenario: str) -> list[dict]:
        if scenario not in cache:
            try:
                results = _launch(tmp_path_factory.mktemp(scenario), scenario, timeout_s=120)
                cache[scenario] = [results[r][scenario] for r in range(WORLD)]
            except pytest.fail.Exception as exc:  # every test of the scenario fails, none relaunches
                cache[scenario] = str(exc)
        if isinstance(cache[scenario], str):
            pytest.fail(cache[scenario])
        return cache[scenario]

    return run


VARIANTS = [
    "default",
    "ns_interval_normuon",
    "eigh_muonrms_adamuon",
    "rank_adamwrms_plain",
    "bf16_normuon",
    "windows_normuon",
    "svd64_normuon",
    "f64_normuon",
]


@pytest.mark.distributed
@distributed
@pytest.mark.parametrize("mode", ["ddp_exact", "fsdp_exact"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_same_gradients_give_bitwise_equal_parameters_and_state(results, mode, variant):
    """DDP (work divided by process_group) and FSDP2 (DTensor shards: 7 rows -> 4 + 3, 1 row -> 1 + 0,
    a conv kernel, a 3-D stack) given the single-process gradients: parameters and the complete
    optimizer state (momentum, second moments, AdamW moments) equal the single-process run's exactly."""
    for rank in range(WORLD):
        r = results[rank][f"{mode}/{variant}"]
        assert r["state_diff"] == 0.0, (rank, r)
        # bfloat16 parameters too: their step is formed in float32 and added in one rounding, the same
        # on a shard as on the whole (torch's bfloat16 add_(O, alpha=lr) rounded lr to bfloat16 in its
        # vectorised loop only, so FSDP2's rows differed from the single process's by up to an ulp)
        assert r["max_abs_diff"] == 0.0, (rank, r)
        assert r["bytes_received"] > 0  # the work really was divided
    # each matrix computed once, and by both ranks in turn: with chunk_bytes=1 (one matrix per rank
    # and window) the owners are still chosen for the whole step, not per window (which gave rank 0
    # every window of one matrix and rank 1 nothing)
    computed = [results[rank][f"{mode}/{variant}"]["computed"] for rank in range(WORLD)]
    # the traffic counters count what goes between ranks: all sent is all received (no self-copies)
    sent = sum(results[rank][f"{mode}/{variant}"]["bytes_sent"] for rank in range(WORLD))
    assert sent == sum(results[rank][f"{mode}/{variant}"]["bytes_received"] for rank in range(WORLD))
    assert all(c > 0 for c in computed), computed
    assert sum(computed) == results[0][f"{mode}/{variant}"]["matrices"], computed  # each once per step
    if mode == "ddp_exact":  # and only its owner builds its momentum direction N_t
        momenta = [results[rank][f"{mode}/{variant}"]["momenta"] for rank in range(WORLD)]
        assert sum(momenta) == sum(computed), (momenta, computed)
    if mode == "fsdp_exact" and variant == "windows_normuon":
        # chunk_bytes=1: each matrix was exchanged, computed and applied in a window of its own (two
        # all_to_all and one all_reduce per window), not all of the group's matrices at once
        one_window = results[0]["fsdp_exact/default"]["collectives"]
        assert results[0][f"{mode}/{variant}"]["collectives"] > 2 * one_window
    if mode == "fsdp_exact" and variant.endswith("normuon"):
        # the row second moment (B, m, 1) is sharded like the rows it belongs to: a linear weight's
        # and a conv kernel's output rows (dim 0 of the parameter, dim 1 of the moment), not replicated
        placements = results[0][f"{mode}/{variant}"]["second_moment_placements"]
        for name in ("fc1.weight", "fc2.weight", "conv.weight"):
            assert placements[name] == "(Shard(dim=1),)", (variant, name, placements)


@pytest.mark.distributed
@distributed
@pytest.mark.parametrize("mode", ["ddp_training", "fsdp_training"])
def test_end_to_end_training_matches_single_process(results, mode):
    """DistributedDataParallel / fully_shard with each rank on half the global batch; FSDP2's gradients are
    the single-process run's (the mean over the global batch, not the sum over ranks)."""
    for rank in range(WORLD):
        assert results[rank][mode]["max_abs_diff"] < TRAINING_TOL, results[rank][mode]
        if mode == "fsdp_training":
            assert results[rank][mode]["max_rel_grad_diff"] < 1e-4, results[rank][mode]
    if mode == "ddp_training":  # dividing the work changes nothing: equal to every rank computing all
        assert results[0][mode]["divided_vs_naive"] == 0.0


@pytest.mark.distributed
@distributed
def test_zero_redundancy_optimizer_over_param_groups_matches_single_process(results):
    """torch's ZeroRedundancyOptimizer with optimizer_class=HTMuon over htmuon.param_groups (the recipe
    in docs/integrations.md): each rank steps the parameters it was given, whole; the training equals
    the single-process optimizer's, and the consolidated state loads back."""
    for rank in range(WORLD):
        assert results[rank]["zero_training"]["max_abs_diff"] < TRAINING_TOL, results[rank]["zero_training"]
        assert results[rank]["zero_training"]["loaded"]


@pytest.mark.distributed
@distributed
def test_fsdp_checkpoint_resumes_exactly(results):
    """torch.distributed.checkpoint save of the FSDP2 optimizer state (normuon, interval 2), reloaded
    into a fresh model and optimizer: the next 3 steps equal the uninterrupted run's bit for bit."""
    for rank in range(WORLD):
        assert results[rank]["fsdp_checkpoint"] == {"max_abs_diff": 0.0, "state_diff": 0.0}


@pytest.mark.distributed
@distributed
@pytest.mark.parametrize("mesh", ["1x2", "2x1"])
def test_hsdp_matches_single_process_exactly(results, mesh):
    """HSDP (fully_shard on a (replicate, shard) mesh): 1 replica of 2 shards / 2 replicas of 1 shard."""
    for rank in range(WORLD):
        r = results[rank][f"hsdp_exact/{mesh}"]
        assert r["max_abs_diff"] == 0.0 and r["state_diff"] == 0.0, (rank, r)
        assert (r["bytes_received"] > 0) == (mesh == "1x2")  # 1 shard per replica: nothing to exchange
        assert (r["bytes_sent"] > 0) == (mesh == "1x2")


@pytest.mark.distributed
@distributed
@pytest.mark.parametrize("variant", ["ns_interval_normuon", "eigh_muonrms_adamuon"])
def test_fsdp_column_shards_match_single_process_exactly(results, variant):
    """fully_shard with ``shard_placement_fn`` putting matrices on Shard(1) (columns split: fc1 (7, 6) ->
    3 + 3, the 3-D stack (3, 4, 6) -> 2 + 2; FSDP2 refuses uneven splits off dim 0, so the rest stay on
    rows): equal to the single process bit for bit. A plug-in's second moment follows the columns where
    it has them (AdaMuon's elementwise (1, 7, 6): Shard(2)) and stays replicated where it does not
    (NorMuon's per-row (1, 7, 1)); a stack's rows are its moment's dim 1 under both plug-ins."""
    for rank in range(WORLD):
        r = results[rank][f"fsdp_columns/{variant}"]
        assert r["max_abs_diff"] == 0.0 and r["state_diff"] == 0.0, (rank, r)
        assert r["bytes_received"] > 0, (rank, r)
    placements = results[0][f"fsdp_columns/{variant}"]["second_moment_placements"]
    assert placements["fc1.weight"] == (
        "(Shard(dim=2),)" if variant.endswith("adamuon") else "(Replicate(),)"
    )
    assert placements["stack.w"] == "(Shard(dim=1),)", placements
    assert placements["fc2.weight"] == "(Shard(dim=1),)", placements  # rows, as in fsdp_exact


@pytest.mark.distributed
@distributed
def test_bad_input_errors(results):
    r0, r1 = results[0]["bad_inputs"], results[1]["bad_inputs"]
    assert "process_group has ranks [0]" in r0["mesh_mismatch"] and "device mesh" in r0["mesh_mismatch"]
    assert r0["not_member"] == "no error"
    assert "this rank (1) is not a member of process_group" in r1["not_member"], r1["not_member"]
    for r in (r0, r1):
        assert "sharded along mesh dimensions [0, 1]" in r["two_sharded_dims"]
        assert "mixes DTensor parameters" in r["mixed"] and "(3, 3)" in r["mixed"]
        # the NaN was on rank 1's shard only; both ranks refuse the step, naming the parameter
        assert "non-finite gradient" in r["nonfinite"] and "'fc1.weight'" in r["nonfinite"]
        assert r["nonfinite_unchanged"] is True
        assert "is a plain tensor but the parameter is a DTensor" in r["plain_state"], r["plain_state"]
        assert "set_optimizer_state_dict" in r["plain_state"]


@pytest.mark.distributed
@distributed
@pytest.mark.parametrize(
    ("case", "rank0", "rank1"),
    [
        (
            "nonfinite",
            "NonFiniteGradientError: non-finite gradient",
            "NonFiniteGradientError: non-finite gradient",
        ),
        ("grad_none", "has a gradient on 1 of 2 ranks", "has a gradient on 1 of 2 ranks"),
        ("check", "other rank(s) refused this step", "Invalid method in param group 0: 'bogus'"),
        ("backend", "rank(s) [1] failed in this step", "RuntimeError: backend failure on rank 1"),
    ],
)
def test_ddp_ranks_refuse_together_and_change_nothing(results, case, rank0, rank1):
    """A NaN on one rank only, a gradient on one rank only, a refused check or a backend failure on one
    rank: both ranks refuse the same step (none waits in a collective), nothing changes, and the next
    good steps pair their collectives and equal the single-process run."""
    for rank, want in ((0, rank0), (1, rank1)):
        r = results[rank]["ddp_refusals"]
        assert want in r[case], (rank, r[case])
        assert r[f"{case}_unchanged"] is True, rank
        assert r["after_diff"] == 0.0 and r["after_state_diff"] == 0.0, r


@pytest.mark.distributed
@distributed
def test_ranks_stepping_different_parameters_or_settings_refuse_together(results):
    """A parameter more, another shape or another chunk_bytes on one rank: one message on every rank
    (not a gloo abort, not silently different replicas), nothing changed."""
    for rank in range(WORLD):
        r = results[rank]["mismatch"]
        differing = {"count": "the number of parameters", "shape": "shapes", "chunk": "chunk_bytes"}
        for case, what in differing.items():
            assert "the ranks step different parameters or settings" in r[case], (rank, case, r[case])
            assert f"; differing: {what}; rank(s) 1 differ from rank 0):" in r[case], (rank, case, r[case])
            assert r[f"{case}_unchanged"] is True, (rank, case)
        assert "the ranks: 2 to 3" in r["count"], r["count"]


@pytest.mark.distributed
@distributed
def test_ranks_that_differ_in_any_setting_refuse_together(alone):
    """A setting changed on one rank only after a good step (as a scheduler stepped on one rank would),
    or a node whose CPU resolves method='auto' to another backend, or step counters one ahead on one
    rank (another checkpoint loaded there): every rank refuses with one message
    naming the setting, nothing changes, and the next step (settings equal again) goes on with equal
    replicas. Before: compute_dtype, ns_dtype and the 'auto' backend aborted gloo (SIGABRT:
    'Received data size doesn't match expected size'), check_finite hung the other rank, and lr, p,
    weight_decay, adamw_betas were accepted, the replicas (FSDP2: the rows) updated differently."""
    named = {
        "compute_dtype": "compute_dtype",
        "ns_dtype": "ns_dtype",
        "lr": "lr",
        "lr_tensor": "lr",
        "p": "p",
        "weight_decay": "weight_decay",
        "adamw_betas": "adamw_betas",
        "check_finite": "check_finite",
        "fsdp_lr": "lr",
        "step_counter": (
            "the step counters (a checkpoint loaded on some ranks only, or a counter set on one: load "
            "the same checkpoint on every rank)"
        ),
        "auto_on_another_cpu": (
            "the spectral backend that method resolves to on each node (method='auto' follows the "
            "node's bfloat16 matmul support; pass method= explicitly), the Newton-Schulz working "
            "dtype that ns_dtype resolves to on each node (ns_dtype='auto' follows the node's "
            "bfloat16 matmul support; pass ns_dtype= explicitly)"
        ),
    }
    for rank, r in enumerate(alone("agreement")):
        for case, what in named.items():
            assert "the ranks step different parameters or settings" in r[case], (rank, case, r[case])
            assert f"; differing: {what}; rank(s) 1 differ from rank 0)" in r[case], (rank, case, r[case])
            assert r[f"{case}_unchanged"] is True, (rank, case)
            if case != "fsdp_lr":
                assert r[f"{case}_after"] == "no error", (rank, case, r[f"{case}_after"])
                assert r[f"{case}_replicas_equal"] is True, (rank, case)
        # method given explicitly: the nodes run the same backend, nothing differs, the step is taken
        assert r["explicit_on_another_cpu"] == "no error", (rank, r["explicit_on_another_cpu"])
        assert r["explicit_on_another_cpu_replicas_equal"] is True


@pytest.mark.distributed
@distributed
def test_a_nan_step_is_refused_from_the_agreed_flags(alone):
    """check_finite=False on one rank, with the checksum made blind to it: the NaN step is refused on
    both ranks, because the refusal comes from the all-reduced flags (the same on every rank), not from
    the checks each rank made. Before: rank 0 refused, rank 1 entered the all_gather and hung."""
    for rank, r in enumerate(alone("finite_blind")):
        assert r["error"].startswith("NonFiniteGradientError: non-finite gradient"), (rank, r)
        assert "'fc1.weight'" in r["error"] and r["unchanged"] is True, (rank, r)
        # check_finite=False on every rank: the step is taken, NaN and all, as in a single process
        assert r["unchecked"] == "no error" and r["unchecked_nan"] is True, (rank, r)


@pytest.mark.distributed
@distributed
@pytest.mark.parametrize("case", ["ddp_momentum", "fsdp_momentum", "fsdp_prepare", "fsdp_assemble"])
def test_a_failure_outside_the_spectral_map_is_refused_on_every_rank(alone, case):
    """A simulated out-of-memory error on rank 1 only while building N_t (DDP, FSDP2), preparing the
    parameters' state (FSDP2) or assembling the whole matrices on the owner (FSDP2): rank 1 raises it,
    rank 0 says that rank 1 failed, nothing changes on either, and the next step pairs its collectives.
    Before: rank 1 raised before the exchange and rank 0 waited in it until the timeout."""
    r0, r1 = alone("failures")
    assert r1[case].startswith("OutOfMemoryError: simulated: out of memory"), r1[case]
    other = (
        "rank(s) [1] failed in this step" if case.startswith("ddp") else "1 other rank(s) failed in this step"
    )
    assert r0[case].startswith(f"RuntimeError: {other}"), r0[case]
    for r in (r0, r1):
        assert "already updated" not in r[case], r  # nothing was: the step's first window failed
        assert r[f"{case}_unchanged"] is True and r[f"{case}_after"] == "no error", r
        assert r.get(f"{case}_replicas_equal", True) is True


@pytest.mark.distributed
@distributed
@pytest.mark.parametrize("case", ["plugin", "adamw"])
def test_a_failure_after_an_exchange_is_told_at_the_next_one(alone, case):
    """A failure on rank 1 after an exchange: the NorMuon plug-in of the first of several windows
    (DDP), told at the second window's all_gather, where both ranks raise (rank 0 having updated the
    first window's parameters, as its message says); or the AdamW part, after the step's last exchange:
    rank 0 completes the step. Either way the replicas may now differ, so the next step is refused on
    both ranks, until both load a checkpoint. Before: rank 0 hung in the second window's all_gather
    (plugin), or both went on stepping from different replicas (adamw)."""
    r0, r1 = alone("late_failures")
    assert r1[case].startswith("OutOfMemoryError: simulated: out of memory"), r1[case]
    if case == "plugin":
        assert r0[case].startswith("RuntimeError: rank(s) [1] failed in this step"), r0[case]
        assert "[2 parameter(s) were already updated by this step" in r0[case], r0[case]
    else:
        assert r0[case] == "no error", r0[case]
    assert "this rank failed an earlier step after an exchange with the other ranks" in r1[f"{case}_next"]
    assert "1 other rank(s) refused this step" in r0[f"{case}_next"], r0[f"{case}_next"]
    for r in (r0, r1):
        assert r[f"{case}_after_load"] == "no error" and r[f"{case}_replicas_equal"] is True, r


@pytest.mark.distributed
@distributed
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_load_state_dict_is_refused_on_every_rank_together(alone, mode):
    """A state dict whose part on rank 1 holds a NaN (FSDP2: rank 1's shard of a momentum, loaded with
    set_optimizer_state_dict; DDP: rank 1's copy): refused on both ranks, and neither changes anything
    (another parameter's state, changed in the dict on every rank, is not loaded either); a good one then
    loads on both. Before: rank 1 refused and rank 0 loaded."""
    r0, r1 = alone("loading")
    assert "momentum_buffer holds NaN or Inf" in r1[mode], r1[mode]
    assert r0[mode].startswith("ValueError: rank(s) [1] refused this state dict"), r0[mode]
    for r in (r0, r1):
        assert r[f"{mode}_unchanged"] is True and r[f"{mode}_good"] == "no error", r


@pytest.mark.distributed
@distributed
@pytest.mark.parametrize("case", ["fsdp_layout", "fsdp_moment_layout"])
def test_state_laid_out_otherwise_than_the_parameters_is_refused_at_load(alone, case):
    """FSDP2 state whose DTensors are sharded otherwise than the step reads them (a column-sharded
    model's momentum in a row-sharded model; a NorMuon moment replicated where the step shards it with
    the rows), loaded with opt.load_state_dict: refused on both ranks with one line naming the state and
    both layouts, nothing changed, and the next step runs. Before: loaded, and the next step failed with
    a bare "The size of tensor a (3) must match the size of tensor b (6)" (or a second-moment shard
    shape)."""
    key = "momentum_buffer" if case == "fsdp_layout" else "second_moment"
    want = "(Shard(dim=0),)" if case == "fsdp_layout" else "(Shard(dim=1),)"
    for r in alone("loading"):
        assert r[case].startswith(
            f"ValueError: optimizer state of parameter 'fc1.weight': {key} has placements"
        ), r[case]
        assert f"where the step needs {want} on DeviceMesh" in r[case], r[case]
        assert r[f"{case}_unchanged"] is True and r[f"{case}_next"] == "no error", r


@pytest.mark.distributed
@distributed
def test_fsdp_checkpoint_saved_on_2_processes_resumes_exactly_on_3(tmp_path):
    """docs/distributed.md: the FSDP2 state reloads into another world size. dcp.save on 2 processes
    after 3 steps, dcp.load on 3 (other shards: 7 rows -> 3 + 3 + 1, the stack's placement Shard(1) ->
    Shard(0)), 3 more steps with the single-process gradients: parameters and every state tensor
    equal the uninterrupted single-process run's."""
    env = {"HTMUON_TEST_RESHARD_DIR": str(tmp_path / "dcp")}
    (tmp_path / "save").mkdir(), (tmp_path / "load").mkdir()
    _launch(tmp_path / "save", "reshard_save", timeout_s=120, env=env)
    results = _launch(tmp_path / "load", "reshard_load", timeout_s=120, world=3, env=env)
    for rank in range(3):
        assert results[rank]["reshard_load"] == {"max_abs_diff": 0.0, "state_diff": 0.0}, (
            rank,
            results[rank],
        )


@pytest.mark.distributed
@distributed
def test_hsdp_replicas_refuse_a_step_together(results):
    r0, r1 = results[0]["hsdp_refusal"], results[1]["hsdp_refusal"]
    assert "other rank(s) failed in this step" in r0["error"], r0
    assert "backend failure on rank 1" in r1["error"], r1
    assert r0["unchanged"] is True and r1["unchanged"] is True


@pytest.mark.distributed
@distributed
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp_dtypes"])
def test_parallel_helpers_train_and_resume(results, mode):
    """htmuon.torchrun: wrap, slice the global batch, train; full state dicts reload exactly (and the
    gathered FSDP2 state continues in a single process). ``fsdp_dtypes``: with ``ns_dtype`` and
    ``compute_dtype`` given as dtypes, whose values torch's full state dicts refused ("Unexpected value
    type <class 'torch.dtype'>")."""
    for rank in range(WORLD):
        r = results[rank][f"parallel_{mode}"]
        assert "error" not in r, r
        assert r["max_abs_diff"] < TRAINING_TOL and r["resume_diff"] == 0.0, r
        if mode.startswith("fsdp"):
            assert r["single_resume_diff"] < TRAINING_TOL, r
            assert r["fsdp_units"] == [True, True, True], r
        else:
            assert r["divides"] is True, r
        assert r["mean_across"] == 1.5 and r["mean_and_any"] == [1.5, True], r
        assert r["mean_and_none"] == [0.0, False], r


def test_fsdp_on_a_torch_without_public_fully_shard_is_refused_with_the_way_out(monkeypatch):
    """torch < 2.6 has no public ``torch.distributed.fsdp.fully_shard`` (torch 2.4's private one needs
    CUDA): ``wrap_model`` says what to do instead of an ImportError from inside it."""
    import torch.distributed.fsdp

    from htmuon import torchrun
    from htmuon.errors import UserError

    monkeypatch.delattr(torch.distributed.fsdp, "fully_shard", raising=False)
    with pytest.raises(UserError, match=r"parallel='fsdp' needs torch >= 2\.6.*use parallel='ddp'"):
        torchrun.wrap_model(torch.nn.Linear(3, 2), torchrun.Parallel(mode="fsdp", world=2))


@pytest.mark.parametrize(
    ("version", "device", "public", "refused"),
    [
        ("2.4.1", "cuda", False, "needs torch >= 2.6"),
        ("2.6.0+cu124", "cpu", True, "on CPUs needs torch >= 2.9 (torch 2.6.0+cu124's"),
        ("2.6.0+cu124", "cuda", True, None),
        ("2.8.0", "cpu", True, "on CPUs needs torch >= 2.9 (torch 2.8.0's"),
        ("2.9.1", "cpu", True, None),
        ("2.10.0a0+git1234", "cpu", True, None),  # 2.10 > 2.9 (not a string comparison)
        ("2.13.0+cpu", "cpu", True, None),
    ],
)
def test_fsdp_refusal_by_torch_release_and_device(version, device, public, refused):
    """On CPUs torch 2.6's FSDP2 fails at the first forward and 2.7-2.8's sum the gradients over the
    processes (measured: torchrun.FSDP_CPU_TORCH); 2.9's trains right."""
    from htmuon import torchrun

    got = torchrun.fsdp_refusal(version, device, public)
    if refused is None:
        assert got is None
    else:
        assert refused in got and got.endswith("use parallel='ddp', or upgrade torch"), got


def test_fsdp_on_a_cpu_with_torch_2_6_is_refused_before_sharding(monkeypatch):
    """wrap_model on a CPU with torch 2.6 says what to do instead of failing inside the first forward;
    the model is left unsharded."""
    import torch.distributed.fsdp

    from htmuon import torchrun
    from htmuon.errors import UserError

    def fully_shard(module):  # torch 2.6 has a public one (a stand-in where this torch has none)
        raise AssertionError("sharded despite the refusal")

    monkeypatch.setattr(torch, "__version__", "2.6.0+cu124")
    monkeypatch.setattr(torch.distributed.fsdp, "fully_shard", fully_shard, raising=False)
    model = torch.nn.Linear(3, 2)
    with pytest.raises(UserError, match=r"parallel='fsdp' on CPUs needs torch >= 2\.9"):
        torchrun.wrap_model(model, torchrun.Parallel(mode="fsdp", world=2), "cpu")
    assert type(model.weight) is torch.nn.Parameter


def test_dtensors_are_found_where_torch_2_4_keeps_them(monkeypatch):
    """torch 2.4 has a ``torch.distributed.tensor`` package without ``DTensor`` (which lives in
    ``torch.distributed._tensor``): once the former was imported (transformers imports it), every
    step failed with an AttributeError. Both layouts, simulated with stand-in modules."""
    import types

    from htmuon import distributed as hd

    class FakeDTensor(torch.Tensor):
        pass

    monkeypatch.setitem(sys.modules, "torch.distributed.tensor", types.ModuleType("torch.distributed.tensor"))
    private = types.ModuleType("torch.distributed._tensor")
    private.DTensor = FakeDTensor
    monkeypatch.setitem(sys.modules, "torch.distributed._tensor", private)
    assert hd._dtensor_module() is private
    assert hd.is_dtensor(torch.zeros(2).as_subclass(FakeDTensor)) and not hd.is_dtensor(torch.zeros(2))
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = htmuon.HTMuon([w], lr=0.02)
    w.grad = torch.randn(4, 3)
    opt.step()  # the step reads is_dtensor for every parameter
    assert int(opt.state[w]["step"]) == 1
    monkeypatch.delitem(sys.modules, "torch.distributed._tensor")
    assert hd._dtensor_module() is None and not hd.is_dtensor(w)


def test_parallel_without_torchrun_is_single_process(monkeypatch):
    from htmuon import torchrun

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    par = torchrun.from_env("auto")
    assert par == torchrun.Parallel() and par.is_main and par.process_group is None
    model = torch.nn.Linear(3, 2)
    assert torchrun.wrap_model(model, par) is model
    x = torch.arange(6)
    assert torchrun.batch_slice(x, par) is x and torchrun.mean_across(2.5, par) == 2.5
    with pytest.raises(ValueError, match="needs a torchrun launch"):
        torchrun.from_env("fsdp")
    with pytest.raises(ValueError, match="Invalid parallel mode: 'dp'"):
        torchrun.from_env("dp")


def test_from_env_under_torchrun_makes_auto_ddp_and_refuses_none(monkeypatch):
    """Under torchrun with 2 processes (the process group taken as formed: nothing starts), "auto" is
    DDP, with this rank, LOCAL_RANK and the timeout; "none" is refused (each rank would train alone);
    with 1 process "auto" is the single-process loop."""
    import torch.distributed as dist

    from htmuon import torchrun

    monkeypatch.delenv("HTMUON_DIST_TIMEOUT", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    assert torchrun.from_env("auto", timeout_s=12) == torchrun.Parallel("ddp", 1, 2, 1, 12.0)
    assert torchrun.from_env("fsdp") == torchrun.Parallel("fsdp", 1, 2, 1, torchrun.DEFAULT_TIMEOUT_S)
    with pytest.raises(ValueError, match="parallel='none' but torchrun started 2 processes"):
        torchrun.from_env("none")
    # the group is formed with the collective timeout (a hung peer then ends the job after it)
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: calls.append((backend, timeout)))
    assert torchrun.from_env("ddp", timeout_s=12).timeout_s == 12.0
    assert calls == [("gloo", datetime.timedelta(seconds=12))]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert torchrun.from_env("auto") == torchrun.from_env("none") == torchrun.Parallel()


def test_batch_slice_splits_rows_evenly():
    from htmuon import torchrun

    x = torch.arange(12).reshape(6, 2)
    parts = [torchrun.batch_slice(x, torchrun.Parallel("ddp", r, 3)) for r in range(3)]
    assert torch.equal(torch.cat(parts), x)
    with pytest.raises(ValueError, match="global batch of 6 rows does not divide among 4 processes"):
        torchrun.batch_slice(x, torchrun.Parallel("ddp", 0, 4))


def test_old_parallel_module_name_is_a_deprecated_alias():
    import importlib
    import sys

    from htmuon import torchrun

    sys.modules.pop("htmuon.parallel", None)
    with pytest.warns(DeprecationWarning, match="renamed htmuon.torchrun"):
        old = importlib.import_module("htmuon.parallel")
    assert old.from_env is torchrun.from_env and old.Parallel is torchrun.Parallel
    assert set(old.__all__) == set(torchrun.__all__)
