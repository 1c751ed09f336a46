"""Regenerate the WeightWatcher reference values that tests/test_diagnostics_ww.py checks against.

Builds three small models deterministically (seeded), trains each briefly on a synthetic task so
their spectra are not pure noise, stores their weights compactly (int8 codes + one float32 scale
per tensor; both tools analyse the *dequantised* float32 matrices, ``codes.float() * scale``, which
any machine reproduces bit for bit), and records WeightWatcher 0.7.7's per-layer results::

    llama   LLaMA-shaped: embedding 256x512, one block (q/k/v/o 512x512, SwiGLU gate/up 1376x512,
            down 512x1376), lm_head 256x512 -- the LLaMA-60M block shapes
    convnet a small CNN on synthetic 16x16 images (Conv2d 3x3 / 1x1 / 2x2, Linear 512->64->10)
    textcnn Embedding + Conv1d + Linear on synthetic token sequences (Conv1d checked in
            WeightWatcher's own convention, ``analyze(..., conv1d="ww")``)

WeightWatcher is not a dependency of htmuon; run this under its own virtualenv::

    python3 -m venv /work/venv-ww
    /work/venv-ww/bin/pip install torch==2.13.0 weightwatcher==0.7.7
    PYTHONPATH=src /work/venv-ww/bin/python scripts/make_ww_reference.py    # ~2-4 min on 2 cores

Outputs: tests/data/ww_reference_weights.npz and tests/data/ww_reference.json.
The model definitions here are imported by the test (this module imports only torch and numpy
at the top).
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, os.pardir, "tests", "data")
WEIGHTS_FILE = "ww_reference_weights.npz"
REFERENCE_FILE = "ww_reference.json"
#: Quantisation step = std / LEVELS_PER_STD (coarse enough to compress well, fine enough that the
#: quantisation noise is ~5% of the weights' spread; the analysed matrices are the dequantised ones).
LEVELS_PER_STD = 6.0
#: Columns compared with WeightWatcher (our name -> WeightWatcher's column).
WW_COLUMNS = (
    "alpha", "xmin", "xmax", "D", "sigma", "num_pl_spikes", "alpha_weighted", "log_alpha_norm",
    "log_norm", "log_spectral_norm", "spectral_norm", "stable_rank", "entropy", "matrix_rank",
    "num_evals", "N", "M", "rf",
)  # fmt: skip


# ----------------------------------------------------------------------------- models


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (
            p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d: int, hidden: int, heads: int):
        super().__init__()
        self.input_layernorm = RMSNorm(d)
        self.self_attn = Attention(d, heads)
        self.post_attention_layernorm = RMSNorm(d)
        self.mlp = SwiGLU(d, hidden)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    """LLaMA-60M block shapes (hidden 512, intermediate 1376, 8 heads), one block, small vocabulary."""

    def __init__(self, vocab: int = 256, d: int = 512, hidden: int = 1376, heads: int = 8, n_layers: int = 1):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, hidden, heads) for _ in range(n_layers))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.embed_tokens(idx)
        for blk in self.layers:
            x = blk(x)
        return self.lm_head(self.norm(x))


class ConvNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),      # 16 -> 8
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 1), nn.ReLU(), nn.MaxPool2d(2),                # 8 -> 4
            nn.Conv2d(64, 32, 2, padding=1), nn.ReLU(), nn.MaxPool2d(2),     # 4 -> 5 -> 2
        )  # fmt: skip
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.features(x).flatten(1))))


class TextCNN(nn.Module):
    def __init__(self, vocab: int = 500, d: int = 32, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.conv1 = nn.Conv1d(d, 64, 5, padding=2)
        self.conv2 = nn.Conv1d(64, 64, 9, padding=4)
        self.head = nn.Linear(64, classes)

    def forward(self, idx):
        x = self.embed(idx).transpose(1, 2)
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.amax(-1))


MODELS = {"llama": TinyLlama, "convnet": ConvNet, "textcnn": TextCNN}


# ----------------------------------------------------------------------------- training


def _train_llama(model: TinyLlama, gen: torch.Generator, steps: int = 120) -> float:
    V = model.lm_head.out_features
    # a sparse random Markov chain: each token has 4 likely successors
    succ = torch.randint(0, V, (V, 4), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        x = torch.empty(16, 65, dtype=torch.long)
        x[:, 0] = torch.randint(0, V, (16,), generator=gen)
        for t in range(64):
            x[:, t + 1] = succ[x[:, t], torch.randint(0, 4, (16,), generator=gen)]
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss)


def _train_convnet(model: ConvNet, gen: torch.Generator, steps: int = 150) -> float:
    protos = torch.randn(10, 3, 16, 16, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        y = torch.randint(0, 10, (64,), generator=gen)
        x = protos[y] + 1.5 * torch.randn(64, 3, 16, 16, generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss)


def _train_textcnn(model: TextCNN, gen: torch.Generator, steps: int = 150) -> float:
    V = model.embed.num_embeddings
    keywords = torch.randint(0, V, (4, 8), generator=gen)  # class c: sequences sprinkled with its keywords
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        y = torch.randint(0, 4, (32,), generator=gen)
        x = torch.randint(0, V, (32, 40), generator=gen)
        pos = torch.randint(0, 40, (32, 6), generator=gen)
        kw = keywords[y][torch.arange(32)[:, None], torch.randint(0, 8, (32, 6), generator=gen)]
        x.scatter_(1, pos, kw)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss)


TRAIN = {"llama": _train_llama, "convnet": _train_convnet, "textcnn": _train_textcnn}


# ----------------------------------------------------------------------------- storage


def quantise(w: torch.Tensor) -> tuple[np.ndarray, np.float32]:
    """int8 codes and a float32 scale with ``codes * scale ~= w`` (std / LEVELS_PER_STD per step)."""
    scale = np.float32(float(w.std()) / LEVELS_PER_STD)
    codes = torch.clamp(torch.round(w / float(scale)), -127, 127).to(torch.int8)
    return codes.numpy(), scale


def dequantise(codes: np.ndarray, scale) -> torch.Tensor:
    """The float32 matrix both tools analyse (one float32 multiply per entry: bit-exact everywhere)."""
    return torch.from_numpy(codes.astype(np.float32)) * torch.tensor(np.float32(scale))


def load_state_dicts(path: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """``{model name: {parameter name: dequantised float32 tensor}}`` from the stored weights."""
    path = path or os.path.join(DATA, WEIGHTS_FILE)
    out: dict[str, dict[str, torch.Tensor]] = {}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            if not key.endswith("::codes"):
                continue
            model, pname = key[: -len("::codes")].split("::", 1)
            out.setdefault(model, {})[pname] = dequantise(z[key], z[key[: -len("codes")] + "scale"])
    return out


def build(name: str, state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """An instance of reference model ``name``, with ``state_dict`` loaded (non-strict) if given."""
    torch.manual_seed(0)
    model = MODELS[name]()
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if unexpected:
            raise KeyError(f"unexpected keys for {name}: {unexpected}")
    return model


# ----------------------------------------------------------------------------- main


def main() -> int:
    import logging

    import scipy
    import weightwatcher

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    os.makedirs(DATA, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    ref: dict = {
        "generated_by": "scripts/make_ww_reference.py",
        "weightwatcher": weightwatcher.__version__,
        "scipy": scipy.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "analyze_kwargs": {"llama": {}, "convnet": {}, "textcnn": {"conv1d": "ww"}},
        "models": {},
    }
    for i, (name, cls) in enumerate(MODELS.items()):
        torch.manual_seed(1234 + i)
        gen = torch.Generator().manual_seed(4321 + i)
        model = cls()
        loss = TRAIN[name](model, gen)
        print(f"{name}: trained, final loss {loss:.3f}", file=sys.stderr)
        sd = {}
        for pname, p in model.state_dict().items():
            if p.ndim < 2:
                continue  # norms and biases are not analysed; keep the file small
            codes, scale = quantise(p.detach())
            arrays[f"{name}::{pname}::codes"] = codes
            arrays[f"{name}::{pname}::scale"] = np.asarray(scale)
            sd[pname] = dequantise(codes, scale)
        model = build(name, sd)
        details = weightwatcher.WeightWatcher(model=model).analyze()
        layers = {}
        for _, r in details.iterrows():
            row = {}
            for col in WW_COLUMNS:
                v = r[col]
                row[col] = (
                    int(v)
                    if col in ("num_pl_spikes", "matrix_rank", "num_evals", "N", "M", "rf")
                    else float(v)
                )
            layers[str(r["longname"])] = row
        ref["models"][name] = {"final_loss": loss, "layers": layers}
        print(f"{name}: {len(layers)} layers, WeightWatcher alphas "
              + ", ".join(f"{k}={v['alpha']:.3f}" for k, v in layers.items()), file=sys.stderr)  # fmt: skip
    np.savez_compressed(os.path.join(DATA, WEIGHTS_FILE), **arrays)
    with open(os.path.join(DATA, REFERENCE_FILE), "w") as f:
        json.dump(ref, f, indent=1, sort_keys=True)
        f.write("\n")
    size = os.path.getsize(os.path.join(DATA, WEIGHTS_FILE)) / 2**20
    print(f"wrote {WEIGHTS_FILE} ({size:.2f} MiB) and {REFERENCE_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
