"""Named model shapes and run presets.

Model presets (``TrainConfig.model``): the paper's LLaMA shapes (arXiv 2603.10067, its
training setup) and tiny ones sized for a 2-core CPU; ResNets for image classification.

Run presets (``--preset``): a set of config overrides plus, for ``htmuon compare``, the grid
of optimizers x seeds (x learning rates). ``lrs`` holds each optimizer's learning rate in the
preset (the matrix-part lr for the Muon family; AdamW's lr for adamw), picked for the tiny CPU
presets by the sweep recorded in RESULTS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# name -> LlamaConfig fields (vocab_size comes from the tokenizer)
LLAMA_PRESETS: dict[str, dict] = {
    # the paper's shapes (hidden / intermediate / layers / heads)
    "llama-60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
    "llama-135m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "llama-350m": dict(
        hidden_size=1024, intermediate_size=2736, num_hidden_layers=24, num_attention_heads=16
    ),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5461, num_hidden_layers=24, num_attention_heads=32),
    # tiny shapes for CPU (same architecture, intermediate ~ 8/3 * hidden as in the paper's shapes);
    # tiny / mini / small span 17x in parameters at vocabulary 2048 (1.3 M / 5.8 M / 22.8 M): the size scan
    "llama-small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=6),
    "llama-mini": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4),
    "llama-tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4),
    "llama-micro": dict(hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=2),
}

# name -> (stage widths, blocks per stage); BasicBlock ResNets (models.ResNet)
RESNET_PRESETS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "resnet-micro": ((8, 16), (1, 1)),
    "resnet-tiny": ((16, 32, 64), (1, 1, 1)),
    "resnet18": ((64, 128, 256, 512), (2, 2, 2, 2)),
    "resnet34": ((64, 128, 256, 512), (3, 4, 6, 3)),
}

MODEL_PRESETS = sorted([*LLAMA_PRESETS, *RESNET_PRESETS])


def model_task(model: str) -> str:
    return "lm" if model in LLAMA_PRESETS or model in GPT2_PRESETS else "image"


@dataclass(frozen=True)
class RunPreset:
    description: str
    config: dict
    optimizers: tuple[str, ...] = ("adamw", "muon", "htmuon")
    seeds: tuple[int, ...] = (0,)
    lrs: dict[str, float] = field(default_factory=dict)  # per-optimizer lr used by this preset
    adamw_lrs: dict[str, float] = field(default_factory=dict)  # per-optimizer AdamW-part lr
    lr_grid: dict[str, tuple[float, ...]] = field(default_factory=dict)  # optional grid search
    # the config keys ``lrs`` were tuned at; compare warns when they are reused under other values
    tuned_at: dict = field(default_factory=dict)
    # (optimizer, "lr" | "adamw_lr") pairs whose preset value was carried from another optimizer's
    # tuned value, never tuned for this one; compare's notes say so
    carried: frozenset = frozenset()


_QUICK = dict(
    model="llama-tiny",
    data="shakespeare",
    vocab_size=2048,
    seq_len=128,
    batch_size=8,
    steps=250,
    warmup_fraction=0.1,  # 25 steps at 250 (the paper's 10%)
    eval_every=50,
    eval_batches=10,
    ckpt_every=50,
    weight_decay=0.1,
    # one thread: on a 2-core machine shared with anything else, two OpenMP threads make the
    # small matrix products of this model 3-10x slower (measured); one thread is robust
    threads=1,
)
# The lrs of RESULTS.md's tuned study of this preset (250 steps, routing standard; a matrix-lr x
# AdamW-part-lr grid per optimizer, extended past its edges, selected on seed 10, reported on seeds
# 0-2; "The tuned study", "Both routings at 250 steps", "Baselines"): Muon 0.01 with the AdamW part
# (embeddings, head, norms) at 0.111; HTMuon (p = 1/8) 0.04 at 0.0333; NorMuon 0.01 at 0.0333;
# AdamW 3e-3 (of 1e-3 / 3e-3 / 1e-2). The AdamW part's lr matters more than anything else here
# (1e-3, the default, is ~0.4 nats worse at 250 steps). htmuon-interval and htmuon-normuon were not
# swept since their current forms: Muon's matrix lr, HTMuon's AdamW-part lr, carried. HTMuon in
# the paper's "raw" scale needs a larger lr than Muon: s^p of the small raw singular values of
# these gradients gives updates ~0.4-0.6x Muon's RMS (measured at init).
_QUICK_LRS = {
    "adamw": 3e-3,
    "muon": 0.01,
    "htmuon": 0.04,
    "htmuon-interval": 0.01,
    "normuon": 0.01,
    "htmuon-normuon": 0.01,
}
_QUICK_ADAMW_LRS = {
    "muon": 0.111,
    "htmuon": 0.0333,
    "htmuon-interval": 0.0333,
    "normuon": 0.0333,
    "htmuon-normuon": 0.0333,
}
# where _QUICK_LRS and _QUICK_ADAMW_LRS were tuned
_QUICK_TUNED_AT = dict(model="llama-tiny", steps=250, routing="standard")
# the values above that were carried, not tuned (NorMuon's AdamW part was fixed in the baselines study)
_QUICK_CARRIED = frozenset(
    {
        ("htmuon-interval", "lr"),
        ("htmuon-interval", "adamw_lr"),
        ("htmuon-normuon", "lr"),
        ("htmuon-normuon", "adamw_lr"),
        ("normuon", "adamw_lr"),
    }
)
#: what every preset that reuses the quick study's lrs passes to RunPreset
_QUICK_TUNING = dict(
    lrs=_QUICK_LRS, adamw_lrs=_QUICK_ADAMW_LRS, tuned_at=_QUICK_TUNED_AT, carried=_QUICK_CARRIED
)

# The size scan: LLaMA tiny / mini / small on Shakespeare at a fixed budget of tokens per parameter
# (0.2: the quick preset's 256 k tokens for llama-tiny's 1.3 M parameters), Muon vs HTMuon at
# p = 1/32, 1/16, 1/8, 3 seeds, each with a matrix-lr x AdamW-part-lr grid. Run one model at a time
# (``--model llama-mini``) or all (``--models llama-tiny,llama-mini,llama-small``: a gap-vs-parameters
# plot; ``--carry-lrs`` tunes each larger model around the smaller one's best). HTMuon is pinned to
# the ``fast`` backend so that a scan continued on another machine runs the same algorithm (its
# working dtype still follows the hardware). The steps are 258 / 1132 / 4457; on one thread of a
# Xeon (AMX) llama-mini takes ~0.75 s per step (~14 min per cell), llama-small ~2.5 s (~3 h per cell);
# on an AMD EPYC (Zen 4, two runs at once) ~0.8 s and ~3.4 s (~4.2 h per cell).
_SIZE_SCAN = {**{k: v for k, v in _QUICK.items() if k != "steps"}, "tokens_per_param": 0.2}
# htmuon: the p grid with an lr per p (RESULTS.md) found p = 1/32, 1/16, 1/8 best at 0.02-0.04 on llama-tiny
_SIZE_SCAN_GRID = {"muon": (0.005, 0.01, 0.02), "htmuon": (0.02, 0.04, 0.08)}

# The paper's LLaMA setup (arXiv 2603.10067): vocab 32000, seq 256, total batch 512 sequences, warmup 10%,
# cosine to 0.1x, weight decay 0.1, bf16, embeddings and head in the spectral group (routing
# "paper"), lrs AdamW part 1e-3 / Muon 0.01 / HTMuon 0.03. 60M: 10k steps; 135M: 20k steps. No
# gradient clipping (the paper's training script's max norm defaults to 0, off, and none of its run
# scripts sets it). 350M: 60k steps, and its run scripts (scripts/350M/*.sh of the paper's repository)
# give Muon and HTMuon lr 5e-3 (AdamW part 1e-3; the paper's tables give no 350M lrs).
_PAPER_LRS = {"adamw": 1e-3, "muon": 0.01, "htmuon": 0.03, "htmuon-interval": 0.03}
_PAPER_LRS_350M = {"adamw": 1e-3, "muon": 5e-3, "htmuon": 5e-3, "htmuon-interval": 5e-3}


#: ResNet on scikit-learn's digits: the CPU image setting (the "digits" preset and ResNet-50's sibling).
_DIGITS = dict(
    model="resnet-tiny",
    data="digits",
    batch_size=64,
    steps=200,
    warmup_steps=20,
    eval_every=25,
    eval_batches=0,
    ckpt_every=100,
    weight_decay=0.0,
    threads=1,
)
_DIGITS_LRS = {"adamw": 3e-3, "muon": 0.02, "htmuon": 0.02, "htmuon-interval": 0.02}


def _gpu_llama(
    model: str, size: str, steps: int, batch_size: int, lrs: dict[str, float] = _PAPER_LRS
) -> RunPreset:
    """The paper's LLaMA run at ``size``: ``steps`` of 512 x 256 tokens (``batch_size`` sequences per
    micro-batch), warmup 10%, routing paper, no gradient clipping, the paper's lrs; needs a GPU."""
    config = dict(
        model=model,
        vocab_size=32000,
        seq_len=256,
        batch_size=batch_size,
        grad_accum=512 // batch_size,
        steps=steps,
        warmup_fraction=0.1,
        eval_every=max(1, steps // 20),
        eval_batches=50,
        ckpt_every=max(1, steps // 10),
        weight_decay=0.1,
        grad_clip=0.0,
        routing="paper",
        dtype="auto",
    )
    return RunPreset(
        f"the paper's LLaMA-{size} run: {steps // 1000}k steps of 512x256 tokens, warmup 10%, routing paper, "
        "no gradient clipping; needs a GPU",
        config,
        lrs=lrs,
        optimizers=("adamw", "muon", "htmuon"),
        tuned_at=dict(model=model, steps=steps, routing="paper", adamw_lr=1e-3),
    )


def _cifar_preset(name: str, title: str) -> RunPreset:
    """ResNet-18 on CIFAR-10/100 pickle batches (the paper's image setting, GPU-sized budget)."""
    return RunPreset(
        f"ResNet-18 on {title} (pickle batches: --data {name}:DIR); needs a GPU for a useful budget",
        dict(
            model="resnet18",
            data=f"{name}:",
            batch_size=128,
            steps=4000,
            warmup_steps=200,
            eval_every=500,
            eval_batches=0,
            ckpt_every=1000,
            weight_decay=5e-4,
        ),
        lrs={"adamw": 1e-3, "muon": 0.02, "htmuon": 0.02, "htmuon-interval": 0.02},
    )


RUN_PRESETS: dict[str, RunPreset] = {
    "quick": RunPreset(
        "AdamW vs Muon vs HTMuon: LLaMA-tiny on the built-in Shakespeare corpus, 1 seed (3-7 min, 2 cores)",
        _QUICK,
        **_QUICK_TUNING,
    ),
    "quick-seeds": RunPreset(
        "the quick preset over 3 seeds (~13 min on 2 CPU cores)",
        _QUICK,
        seeds=(0, 1, 2),
        **_QUICK_TUNING,
    ),
    "quick-lr": RunPreset(
        "the quick preset with a learning-rate grid per optimizer (best lr picked on validation)",
        _QUICK,
        **_QUICK_TUNING,
        lr_grid={"adamw": (1e-3, 3e-3, 1e-2), "muon": (0.005, 0.01, 0.02), "htmuon": (0.02, 0.04, 0.08)},
    ),
    "size-scan": RunPreset(
        "Muon vs HTMuon p=1/32,1/16,1/8 at 0.2 tokens/param, 3 seeds, lr grid; --models for the scan (CPU)",
        _SIZE_SCAN,
        optimizers=(
            "muon",
            "htmuon:method=fast,p=0.03125",
            "htmuon:method=fast,p=0.0625",
            "htmuon:method=fast",
        ),
        seeds=(0, 1, 2),
        **_QUICK_TUNING,
        lr_grid=_SIZE_SCAN_GRID,
    ),
    "smoke": RunPreset(
        "a seconds-long end-to-end check (LLaMA-micro, 20 steps)",
        dict(
            model="llama-micro",
            data="shakespeare",
            vocab_size=512,
            seq_len=32,
            batch_size=4,
            steps=20,
            warmup_steps=2,
            eval_every=10,
            eval_batches=2,
            ckpt_every=10,
            threads=1,  # as _QUICK: torch's default threads make it ~10x slower on a busy 2-core machine
        ),
        **_QUICK_TUNING,
    ),
    "gpu-60m": _gpu_llama("llama-60m", "60M", 10_000, 128),
    "gpu-135m": _gpu_llama("llama-135m", "135M", 20_000, 64),
    "gpu-350m": _gpu_llama("llama-350m", "350M", 60_000, 64, _PAPER_LRS_350M),
    "digits": RunPreset(
        "ResNet-tiny on scikit-learn's digits: AdamW vs Muon vs HTMuon, 3 seeds (~1 min on CPU)",
        _DIGITS,
        seeds=(0, 1, 2),
        lrs=_DIGITS_LRS,
    ),
    **{
        name: _cifar_preset(name, classes)
        for name, classes in (("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100"))
    },
}


# ----------------------------------------------------------------------------- the paper's other models
# GPT-2 (Hugging Face GPT2Config fields; vocab_size from the tokenizer), bottleneck ResNets (CIFAR
# stem) and ViTs (Hugging Face ViTConfig fields; image size from the data), each with CPU siblings.

GPT2_PRESETS: dict[str, dict] = {
    "gpt2-small": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024),  # 124M with 50257 tokens
    "gpt2-tiny": dict(n_embd=128, n_layer=4, n_head=4, n_positions=256),
    "gpt2-micro": dict(n_embd=32, n_layer=2, n_head=2, n_positions=64),
}

# name -> (stage widths, blocks per stage); Bottleneck blocks (1x1, 3x3, 1x1 x4 expansion)
BOTTLENECK_PRESETS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "resnet50": ((64, 128, 256, 512), (3, 4, 6, 3)),
    "resnet50-tiny": ((16, 32, 64), (1, 1, 1)),
    "resnet50-micro": ((4, 8), (1, 1)),
}

VIT_PRESETS: dict[str, dict] = {
    # ViT-Tiny (DeiT-Ti shape): 192 wide, 12 layers, 3 heads, MLP 768, 16x16 patches (224x224 images)
    "vit-tiny": dict(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, patch_size=16
    ),
    # CIFAR-sized (32x32, 4x4 patches) and digits-sized (8x8, 2x2 patches) siblings
    "vit-tiny-cifar": dict(
        hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768, patch_size=4
    ),
    "vit-micro": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=2
    ),
}

MODEL_PRESETS = sorted([*MODEL_PRESETS, *GPT2_PRESETS, *BOTTLENECK_PRESETS, *VIT_PRESETS])


# ----------------------------------------------------------------------------- the paper's other experiments
# Each GPU preset lays out one of the paper's experiments at its scale (arXiv 2603.10067; where the paper
# gives no setting, the source of the choice is named) and has a CPU-scale sibling (same data kind,
# model family and optimizer set, sized to run here). The dataset folders are the user's:
# --data PATH (OpenWebText JSONL / hf-cache:NAME), cifar100:DIR, imagenet:DIR.

#: The optimizers of the paper's image experiments; for ViT-Tiny HTMuon runs at p = 1/32 (arXiv 2603.10067).
_VIT_HTMUON = "htmuon:p=0.03125"

RUN_PRESETS.update(
    {
        "gpu-gpt2": RunPreset(
            "GPT-2 small (124M) on OpenWebText, 1024-token sequences, 480 per step (nanoGPT / MARS setup); "
            "needs a GPU, --data OPENWEBTEXT and --tokenizer GPT2_TOKENIZER_DIR",
            dict(
                model="gpt2-small",
                data="hf-cache:Skylion007/openwebtext",
                vocab_size=50257,  # the local BPE's size when no --tokenizer is given
                seq_len=1024,
                batch_size=16,
                grad_accum=30,
                steps=10000,
                warmup_steps=1000,
                eval_every=500,
                eval_batches=50,
                ckpt_every=500,
                weight_decay=0.1,
                val_fraction=0.005,
                dtype="auto",
            ),
            # AdamW 6e-4 (GPT-2 small, nanoGPT/MARS); Muon 0.01, HTMuon 0.03 as in the paper's LLaMA runs
            # (the paper gives no GPT-2 learning rates)
            lrs={"adamw": 6e-4, "muon": 0.01, "htmuon": 0.03, "htmuon-interval": 0.03},
            optimizers=("adamw", "muon", "htmuon"),
        ),
        "gpt2-cpu": RunPreset(
            "the gpu-gpt2 layout at CPU scale: GPT-2-tiny on the built-in corpus (~5 min, 2 cores)",
            {**_QUICK, "model": "gpt2-tiny"},
            **_QUICK_TUNING,
            optimizers=("adamw", "muon", "htmuon"),
        ),
        "gpu-resnet50-cifar100": RunPreset(
            "ResNet-50 (bottleneck, CIFAR stem) on CIFAR-100, 200 epochs of batch 128 with crop + flip "
            "augmentation (the usual CIFAR recipe); needs a GPU and --data cifar100:DIR",
            dict(
                model="resnet50",
                data="cifar100:",
                batch_size=128,
                steps=78200,  # 200 epochs x 391 steps
                warmup_steps=782,
                eval_every=3910,
                eval_batches=0,
                ckpt_every=3910,
                weight_decay=5e-4,
                dtype="auto",
            ),
            lrs={"adamw": 1e-3, "muon": 0.02, "htmuon": 0.02, "htmuon-interval": 0.02},
            optimizers=("adamw", "muon", "htmuon"),
            seeds=(0, 1, 2),
        ),
        "resnet50-cpu": RunPreset(
            "the gpu-resnet50-cifar100 layout at CPU scale: ResNet-50-tiny (bottleneck) on digits, 3 seeds",
            {**_DIGITS, "model": "resnet50-tiny"},
            lrs=_DIGITS_LRS,
            optimizers=("adamw", "muon", "htmuon"),
            seeds=(0, 1, 2),
        ),
        "gpu-vit-tiny": RunPreset(
            "ViT-Tiny on ImageNet-1K at 224x224, batch 1024, HTMuon p = 1/32, lr grid {0.003, 0.004, "
            "0.005} (arXiv 2603.10067), 300 epochs (DeiT-Ti's budget); needs GPUs and --data imagenet:DIR",
            dict(
                model="vit-tiny",
                data="imagenet:",
                batch_size=256,
                grad_accum=4,  # 1024 images per step
                steps=375300,  # 300 epochs x 1251 steps
                warmup_steps=6255,  # 5 epochs
                eval_every=6255,
                eval_batches=0,
                ckpt_every=1251,
                weight_decay=0.05,
                dtype="auto",
            ),
            lrs={"adamw": 1e-3, "muon": 0.004, "htmuon": 0.004},
            lr_grid={"muon": (0.003, 0.004, 0.005), _VIT_HTMUON: (0.003, 0.004, 0.005)},
            optimizers=("adamw", "muon", _VIT_HTMUON),
        ),
        "vit-cpu": RunPreset(
            "the gpu-vit-tiny layout at CPU scale: ViT-micro on digits, HTMuon p = 1/32, 3 seeds (~2 min)",
            {**_DIGITS, "model": "vit-micro", "weight_decay": 0.05},
            lrs={"adamw": 3e-3, "muon": 0.02, "htmuon": 0.02},
            optimizers=("adamw", "muon", _VIT_HTMUON),
            seeds=(0, 1, 2),
        ),
    }
)
