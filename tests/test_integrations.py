"""One tested recipe per training stack (docs/integrations.md): a plain loop, Hugging Face Trainer
(``optimizers=`` and ``optimizer_cls_and_kwargs=``), Lightning (scheduler + exact resume from a
``.ckpt``) and accelerate (``prepare`` / ``save_state`` / ``load_state``). Real libraries, tiny
LLaMA on CPU; each library's tests skip when it is not installed (``pip install htmuon[integrations]``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import htmuon
from helpers import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64
STANDARD_ADAMW = {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}


def batches(n: int, batch: int = 2, seq: int = 9) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


def routed(opt: torch.optim.Optimizer) -> dict[str, set[str]]:
    """algorithm -> parameter names (the names without a wrapper's prefix)."""
    out: dict[str, set[str]] = {}
    for g in opt.param_groups:
        names = {re.sub(r"^(model\.)?(?=model\.|lm_head)", "", n) for n in g["param_names"]}
        out.setdefault(g["algorithm"], set()).update(names)
    return out


def assert_standard_routing(opt: torch.optim.Optimizer) -> None:
    groups = routed(opt)
    assert STANDARD_ADAMW <= groups["adamw"]
    assert "model.layers.0.mlp.down_proj.weight" in groups["htmuon"]
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in groups["htmuon"])


# --------------------------------------------------------------------------------------------
# plain loop: the README's Quick start, as written
# --------------------------------------------------------------------------------------------


def test_readme_api_signature_is_the_constructors():
    """README's "API" block is HTMuon.__init__'s signature: every keyword, its default, positional or
    keyword-only (a keyword was missing before)."""
    import inspect

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## API\s+```python\n(htmuon\.HTMuon\(.*?\))\n```", text, flags=re.S).group(1)
    scope: dict = {}
    exec("def documented" + block[len("htmuon.HTMuon") :] + ": pass", scope)  # the block as a signature
    doc = inspect.signature(scope["documented"]).parameters
    code = dict(inspect.signature(htmuon.HTMuon.__init__).parameters)
    del code["self"]
    assert list(doc) == list(code), set(doc) ^ set(code)
    for name, param in code.items():
        assert (doc[name].kind, doc[name].default) == (param.kind, param.default), name


def test_readme_quick_start_runs_and_routes(capsys):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"## Quick start\s+```python\n(.*?)```", text, flags=re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md (Quick start)", "exec"), scope)
    opt = scope["opt"]
    by_algorithm = {g["algorithm"]: g for g in opt.param_groups}
    assert by_algorithm["htmuon"]["param_names"] == ["mlp.0.weight", "mlp.2.weight"]
    assert set(by_algorithm["adamw"]["param_names"]) == {
        "embed.weight", "mlp.0.bias", "mlp.2.bias", "norm.weight", "norm.bias", "lm_head.weight",
    }  # fmt: skip
    assert by_algorithm["adamw"]["lr"] == 1e-3 and by_algorithm["htmuon"]["lr"] == 0.02
    assert all(opt.state[p]["step"] == 10 for g in opt.param_groups for p in g["params"])
    assert "htmuon 0.02 ['mlp.0.weight', 'mlp.2.weight']" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Hugging Face Trainer
# --------------------------------------------------------------------------------------------


def unwrap(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (what the Trainer holds)."""
    return getattr(opt, "optimizer", opt)


def hf_trainer(tmp_path: Path, model, **kwargs):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the Trainer needs it
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    data = [{"input_ids": t, "labels": t} for t in torch.cat(batches(3))]
    return transformers.Trainer(model=model, args=args, train_dataset=data, **kwargs)


def test_hf_trainer_optimizers(tmp_path):
    model = tiny_llama()
    opt = htmuon.HTMuon(model.named_parameters(), lr=0.02, adamw_lr=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    trainer = hf_trainer(tmp_path, model, optimizers=(opt, sched))
    trainer.train()
    assert unwrap(trainer.optimizer) is opt
    assert_standard_routing(opt)
    assert opt.state[model.lm_head.weight]["step"] == 3 and "exp_avg" in opt.state[model.lm_head.weight]
    assert not torch.equal(before, model.model.layers[0].mlp.down_proj.weight)


def test_hf_trainer_optimizer_cls_and_kwargs(tmp_path):
    model = tiny_llama()
    kwargs = {"params": model.named_parameters(), "lr": 0.02, "adamw_lr": 1e-3, "weight_decay": 0.1}
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    trainer = hf_trainer(tmp_path, model, optimizer_cls_and_kwargs=(htmuon.HTMuon, kwargs))
    trainer.train()
    opt = unwrap(trainer.optimizer)
    assert isinstance(opt, htmuon.HTMuon)
    assert_standard_routing(opt)
    # it really stepped the model (3 steps), not only got built
    assert opt.state[model.model.layers[0].mlp.down_proj.weight]["step"] == 3
    assert not torch.equal(before, model.model.layers[0].mlp.down_proj.weight)
    assert {g["lr"] for g in opt.param_groups if g["algorithm"] == "adamw"} <= {1e-3, 0.0}
    assert "params" not in kwargs  # the Trainer pops it: docs/integrations.md, build kwargs per Trainer


def test_hf_trainer_without_names_routes_by_ndim(tmp_path):
    """What the docs warn about: the Trainer's own groups carry no names, so only shapes count."""
    model = tiny_llama()
    trainer = hf_trainer(tmp_path, model, optimizer_cls_and_kwargs=(htmuon.HTMuon, {"lr": 0.02}))
    opt = unwrap(trainer.create_optimizer())
    htmuon_ids = {id(p) for g in opt.param_groups if g["algorithm"] == "htmuon" for p in g["params"]}
    assert id(model.model.embed_tokens.weight) in htmuon_ids and id(model.lm_head.weight) in htmuon_ids


# --------------------------------------------------------------------------------------------
# Lightning: configure_optimizers with a scheduler; resume from a .ckpt equals an uninterrupted run
# --------------------------------------------------------------------------------------------


def lightning_run(ckpt_path: Path | None = None, stop_after_epoch: Path | None = None):
    """Two epochs of 4 steps with the docs' recipe (docs/integrations.md); with ``stop_after_epoch``
    the run stops after its first epoch (as an interrupted job would) and saves a checkpoint there."""
    L = pytest.importorskip("lightning")

    class LitLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama()

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            opt = htmuon.HTMuon(self.named_parameters(), lr=0.02, adamw_lr=1e-3, weight_decay=0.1)
            steps = self.trainer.estimated_stepping_batches  # max_steps is -1 when max_epochs is given
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=2e-3)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class StopAfterFirstEpoch(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    module = LitLM()
    loader = torch.utils.data.DataLoader(torch.cat(batches(4)), batch_size=2)  # 4 steps an epoch
    trainer = L.Trainer(
        max_epochs=2,
        callbacks=[StopAfterFirstEpoch()] if stop_after_epoch else [],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path, weights_only=True)
    if stop_after_epoch is not None:
        trainer.save_checkpoint(stop_after_epoch)
    return module, trainer


@pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # lightning 2.6 on torch 2.13's pytree
def test_lightning_scheduler_and_exact_resume(tmp_path):
    full, trainer = lightning_run()
    opt = trainer.optimizers[0]
    assert isinstance(opt, htmuon.HTMuon) and trainer.global_step == 8
    assert_standard_routing(opt)
    # the cosine ran its whole course over the run's 8 steps: both lrs end at eta_min
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3, 2e-3])
    _, trainer = lightning_run(stop_after_epoch=tmp_path / "epoch1.ckpt")
    assert trainer.global_step == 4
    resumed, trainer = lightning_run(ckpt_path=tmp_path / "epoch1.ckpt")
    assert trainer.global_step == 8
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------------------------
# accelerate: prepare / save_state / load_state
# --------------------------------------------------------------------------------------------


def test_accelerate_save_and_load_state(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    data = batches(4)

    def setup():
        model = tiny_llama()
        opt = htmuon.HTMuon(model.named_parameters(), lr=0.02, adamw_lr=1e-3, weight_decay=0.1)
        accelerator = accelerate.Accelerator(cpu=True)
        model, opt = accelerator.prepare(model, opt)
        return accelerator, model, opt

    def train(accelerator, model, opt, steps):
        for tokens in steps:
            opt.zero_grad()
            accelerator.backward(model(input_ids=tokens, labels=tokens).loss)
            opt.step()

    accelerator, model, opt = setup()
    assert_standard_routing(unwrap(opt))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(accelerator, model, opt, data[:2])
    # the prepared optimizer steps HTMuon (else the resume below would compare untrained models)
    assert all(s["step"] == 2 for s in unwrap(opt).state.values())
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters()), "a parameter did not move"
    accelerator.save_state(str(tmp_path / "state"))
    train(accelerator, model, opt, data[2:])

    accelerator2, model2, opt2 = setup()
    accelerator2.load_state(str(tmp_path / "state"))
    train(accelerator2, model2, opt2, data[2:])
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------------------------
# torchtitan: the import error says what is missing (the adapter's tests: test_distributed_torchtitan.py)
# --------------------------------------------------------------------------------------------


def _import_torchtitan_adapter(monkeypatch, sys_path: list[str], block: bool = False) -> ImportError:
    """The ImportError of ``import htmuon.integrations.torchtitan`` with ``sys_path`` (``block``: with
    torchtitan unimportable); sys.modules and sys.path are left as they were."""
    import importlib
    import sys

    with monkeypatch.context() as mp:
        for name in [m for m in sys.modules if m.startswith(("torchtitan", "htmuon.integrations."))]:
            mp.delitem(sys.modules, name)
        mp.setattr(sys, "path", sys_path)
        if block:
            mp.setitem(sys.modules, "torchtitan", None)
        try:
            with pytest.raises(ImportError) as info:
                importlib.import_module("htmuon.integrations.torchtitan")
        finally:  # what this import added goes; the context puts back what was there
            for name in [m for m in sys.modules if m.startswith("torchtitan")]:
                del sys.modules[name]
    return info.value


def test_torchtitan_adapter_import_error_names_what_is_missing(tmp_path, monkeypatch):
    """Without torchtitan: "it is not installed". With torchtitan but one of its own imports
    failing (tyro, spmd_types: the dependencies a --no-deps install lacks): that module's name, where the
    message said "pip install torchtitan" to one who had it."""
    import sys

    bare = [p for p in sys.path if not (Path(p) / "torchtitan").exists()]
    assert "needs torchtitan: it is not installed" in str(
        _import_torchtitan_adapter(monkeypatch, bare, block=True)
    )

    pkg = tmp_path / "torchtitan"
    (pkg / "components").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "components" / "__init__.py").write_text("")
    (pkg / "components" / "optimizer.py").write_text("import tyro_is_not_installed_here\n")
    message = str(_import_torchtitan_adapter(monkeypatch, [str(tmp_path), *bare]))
    assert "tyro_is_not_installed_here" in message and "not installed (pip" not in message, message
