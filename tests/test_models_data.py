"""The paper's other models (GPT-2, ResNet-50, ViT-Tiny) and data sources (streamed text into a
memmapped token cache, local Hugging Face tokenizers, CIFAR pickles, ImageNet folders)."""

from __future__ import annotations

import gzip
import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from helpers import TINY_RUN, flock_held_elsewhere  # noqa: E402
from htmuon.cli import UserError  # noqa: E402
from htmuon.train.config import TrainConfig  # noqa: E402
from htmuon.train.data import (  # noqa: E402
    ImageFolderData,
    TokenData,
    build_token_streams,
    chunk_document,
    iter_file_chunks,
    load_image_data,
    parse_imagenet_source,
    text_splits,
)
from htmuon.train.loop import train  # noqa: E402
from htmuon.train.models import (  # noqa: E402
    build_gpt2,
    build_image_model,
    build_llama,
    build_lm,
    build_resnet,
    build_vit,
)
from htmuon.train.optimizers import build_optimizer, resolve  # noqa: E402
from htmuon.train.presets import MODEL_PRESETS, model_task  # noqa: E402
from htmuon.train.tokenizer import encode_docs, prepare_tokens  # noqa: E402


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- models


def test_gpt2_uses_linear_layers_equal_to_hf_conv1d():
    """GPT-2's Conv1D (in x out) layers become nn.Linear (out x in) computing the same function."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = build_gpt2("gpt2-micro", 300, 16)
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as GPT-2
    c_fc = model.transformer.h[0].mlp.c_fc
    assert isinstance(c_fc, torch.nn.Linear) and c_fc.weight.shape == (4 * 32, 32)  # out x in
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    ref.eval(), model.eval()
    x = torch.randint(0, 300, (2, 16))
    assert torch.allclose(model(input_ids=x).logits, ref(input_ids=x).logits, atol=1e-5)


def test_gpt2_small_has_124m_parameters():
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_gpt2("gpt2-small", 50257, 1024)
    assert count(model) == 124_439_808


def test_resnet50_is_the_bottleneck_resnet():
    with torch.device("meta"):
        model = build_resnet("resnet50", 3, 10)
    assert count(model) == 23_520_842  # the CIFAR ResNet-50 (3x3 stem), 10 classes
    assert len(model.layers) == 3 + 4 + 6 + 3
    block = model.layers[0]
    assert [c.kernel_size for c in (block.conv1, block.conv2, block.conv3)] == [(1, 1), (3, 3), (1, 1)]
    assert model.fc.in_features == 2048
    micro = build_resnet("resnet50-micro", 1, 10)
    assert micro(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_resnets_halve_the_resolution_at_each_new_stage():
    """The CIFAR ResNet: a stride-1 3x3 stem, then stride 2 in the first block of every stage but the
    first (on the 3x3 convolution of a Bottleneck, and on its projection shortcut)."""
    with torch.device("meta"):
        r18, r50 = build_resnet("resnet18", 3, 10), build_resnet("resnet50", 3, 10)
    assert r18.conv1.stride == (1, 1) and r50.conv1.stride == (1, 1)
    for model, blocks in ((r18, (2, 2, 2, 2)), (r50, (3, 4, 6, 3))):
        firsts = {sum(blocks[:i]) for i in range(1, len(blocks))}
        for k, block in enumerate(model.layers):
            want = (2, 2) if k in firsts else (1, 1)
            if hasattr(block, "conv3"):  # Bottleneck
                assert (block.conv1.stride, block.conv2.stride, block.conv3.stride) == ((1, 1), want, (1, 1))
            else:
                assert (block.conv1.stride, block.conv2.stride) == (want, (1, 1))
            if k in firsts:
                assert block.shortcut[0].stride == (2, 2)
    micro = build_resnet("resnet-micro", 3, 10)
    seen = []
    micro.layers[-1].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    micro(torch.randn(2, 3, 32, 32))
    assert seen == [(2, 16, 16, 16)]  # two stages: 32 -> 32 -> 16


def test_llama_is_untied_rmsnorm_and_language_models_take_longer_sequences():
    """LLaMA: untied embedding and head (the paper's 60M shape has 58.1M parameters at vocabulary 32000),
    RMSNorm and bias-free linear layers, position tables sized for the run's seq_len; GPT-2's learned
    position table grows to a seq_len beyond its preset's."""
    with torch.device("meta"):
        m = build_llama("llama-60m", 32000, 1024)
    h, i, L = 512, 1376, 8
    assert count(m) == 2 * 32000 * h + L * (4 * h * h + 3 * h * i + 2 * h) + h
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    assert m.config.max_position_embeddings >= 1024
    norms = [type(x).__name__ for x in m.modules() if "Norm" in type(x).__name__]
    assert norms == ["LlamaRMSNorm"] * (2 * L + 1)
    assert all(x.bias is None for x in m.modules() if isinstance(x, torch.nn.Linear))
    torch.manual_seed(0)
    gpt = build_gpt2("gpt2-micro", 300, 128)  # the preset's table holds 64 positions
    assert gpt(input_ids=torch.randint(0, 300, (1, 128))).logits.shape == (1, 128, 300)


def test_vit_tiny_has_the_deit_tiny_shape():
    with torch.device("meta"):
        model = build_vit("vit-tiny", 3, 1000, 224)
    assert count(model) == 5_717_416  # DeiT-Ti / ViT-Ti/16 with a 1000-class head
    micro = build_image_model("vit-micro", 1, 10, 8)
    assert micro(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(UserError, match="do not tile 7x7"):
        build_vit("vit-micro", 1, 10, 7)


def test_model_presets_are_known_and_tasked():
    for name in ("gpt2-small", "gpt2-tiny", "gpt2-micro"):
        assert name in MODEL_PRESETS and model_task(name) == "lm"
    for name in ("resnet50", "resnet50-tiny", "resnet50-micro", "vit-tiny", "vit-tiny-cifar", "vit-micro"):
        assert name in MODEL_PRESETS and model_task(name) == "image"
    assert build_lm("gpt2-micro", 300, 16).config.n_embd == 32


def test_cpu_run_presets_use_one_thread():
    """Every CPU run preset (smoke included) runs on one torch thread: torch's default on a busy 2-core
    machine made the smoke preset's seconds-long check ~10x slower (the comment at presets._QUICK)."""
    from htmuon.train.presets import RUN_PRESETS

    cpu = [name for name, p in RUN_PRESETS.items() if "GPU" not in p.description]
    assert "smoke" in cpu and "quick" in cpu and "digits" in cpu
    assert {name: RUN_PRESETS[name].config.get("threads") for name in cpu} == dict.fromkeys(cpu, 1)


def test_vit_tokens_and_positions_go_to_adamw():
    """The class token (1x1xd) and position table (1xNxd) are not weight matrices: AdamW part, no decay."""
    model = build_image_model("vit-micro", 1, 10, 8)
    for name in ("htmuon", "galore", "cosmos"):
        if name == "galore":
            pytest.importorskip("pytorch_optimizer")
        opt = build_optimizer(model, resolve(TrainConfig(model="vit-micro", optimizer=name)))
        emb = model.model.vit.embeddings
        for table in (emb.cls_token, emb.position_embeddings):
            (group,) = [g for g in opt.param_groups if any(p is table for p in g["params"])]
            assert group["weight_decay"] == 0.0
            assert group.get("algorithm", "adamw") == "adamw"
            assert name != "galore" or "rank" not in group  # not projected


def test_vit_tables_keep_their_place_at_the_end_of_the_adamw_group_under_paper_routing():
    """Routing paper sent the class token and the position table to HTMuon by name and ndim, and the
    harness moved them to the end of the AdamW group. Since the 1 x 1 x d class token is a vector in
    disguise (AdamW in param_groups), the harness still puts both last, in the model's order: the
    group's order, which a run folder's optimizer state follows, is unchanged (--resume of older runs)."""
    model = build_image_model("vit-micro", 1, 10, 8)
    opt = build_optimizer(model, resolve(TrainConfig(model="vit-micro", optimizer="htmuon", routing="paper")))
    emb = model.model.vit.embeddings
    (adamw,) = [g for g in opt.param_groups if g["algorithm"] == "adamw" and len(g["params"]) > 2]
    assert adamw["params"][-2] is emb.cls_token and adamw["params"][-1] is emb.position_embeddings
    assert sum(p is emb.cls_token for g in opt.param_groups for p in g["params"]) == 1


@pytest.mark.parametrize("model", ["gpt2-micro", "resnet50-micro", "vit-micro"])
def test_new_models_train_end_to_end(model, corpus_file, tmp_path, capsys):
    data = str(corpus_file) if model_task(model) == "lm" else "digits"
    cfg = TrainConfig(
        **{**TINY_RUN, "model": model, "data": data, "out_dir": str(tmp_path / "r"), "progress": "log"}
    )
    out = train(cfg)
    assert out["finished"] and np.isfinite(out["final_val_loss"])
    # the progress lines' throughput: tokens for language models, images for image models
    assert (" tok/s" if model_task(model) == "lm" else " img/s") in capsys.readouterr().err
    if model_task(model) == "image":  # digits: 1 channel, 10 classes, 8x8
        assert out["info"]["parameters"] == count(build_image_model(model, 1, 10, 8))


# ----------------------------------------------------------------------------- streaming text


def test_file_chunks_stream_equals_chunk_document(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta\n", "gamma delta", "\n\n", "é" * 7, "x" * 90]
    text = "".join(rng.choice(words) for _ in range(3000))
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    for chunk_chars, block in ((100, 37), (100, 1000), (8192, 333)):
        assert list(iter_file_chunks(path, chunk_chars, block)) == chunk_document(text, chunk_chars)
    gz = tmp_path / "t.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(text)
    assert "".join(iter_file_chunks(gz)) == text


def test_streamed_tokens_equal_the_in_memory_path(corpus_file):
    """Same split rule, same BPE, same token streams as text_splits + prepare_tokens."""
    streams = build_token_streams(str(corpus_file), vocab_size=400, val_fraction=0.1)
    tok, tr, va, _ = prepare_tokens(text_splits(str(corpus_file), 0.1), 400)
    assert isinstance(streams.train, np.memmap) and streams.train.dtype == np.uint16
    assert np.array_equal(np.asarray(streams.train), tr) and np.array_equal(np.asarray(streams.val), va)
    assert streams.vocab_size == tok.get_vocab_size()


def test_small_corpus_holds_out_its_last_chunk(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(("to be or not to be\n" * 500)[:9000])  # two chunks < k = 20
    streams = build_token_streams(str(path), vocab_size=300, val_fraction=0.05)
    tok, tr, va, _ = prepare_tokens(text_splits(str(path), 0.05), 300)
    assert np.array_equal(np.asarray(streams.train), tr) and np.array_equal(np.asarray(streams.val), va)


def test_token_cache_is_reused_and_never_left_partial(corpus_file, tmp_path, monkeypatch):
    import htmuon.train.data as data_mod

    monkeypatch.setenv("HTMUON_CACHE", str(tmp_path / "cache"))
    calls = {"n": 0}
    real = data_mod._BPE.encode_batch

    def failing(self, texts):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # a run killed while tokenising
        return real(self, texts)

    monkeypatch.setattr(data_mod, "ENCODE_BATCH_CHUNKS", 4)
    monkeypatch.setattr(data_mod._BPE, "encode_batch", failing)
    with pytest.raises(KeyboardInterrupt):
        build_token_streams(str(corpus_file), vocab_size=300, val_fraction=0.1)
    assert not list((tmp_path / "cache" / "streams").iterdir())  # no cache, no temp folder left
    monkeypatch.setattr(data_mod._BPE, "encode_batch", real)
    first = build_token_streams(str(corpus_file), vocab_size=300, val_fraction=0.1)
    mtime = (first.cache / "train.bin").stat().st_mtime_ns
    monkeypatch.setattr(data_mod._BPE, "encode_batch", failing)  # a cache hit tokenises nothing
    calls["n"] = 1
    again = build_token_streams(str(corpus_file), vocab_size=300, val_fraction=0.1)
    assert again.cache == first.cache and (again.cache / "train.bin").stat().st_mtime_ns == mtime


def test_a_killed_token_cache_build_is_removed_by_the_next_build_on_its_host(
    corpus_file, tmp_path, monkeypatch
):
    """A build holds a lock in its temporary folder; a folder whose lock names a dead process on this
    host is removed by the next build (it was left for ever, gigabytes for a large corpus); one of
    another host, or without a lock, is left alone."""
    import socket

    import htmuon.train.data as data_mod

    monkeypatch.setenv("HTMUON_CACHE", str(tmp_path / "cache"))
    streams = tmp_path / "cache" / "streams"
    held = []
    real = data_mod.tokens_digest

    def digest(*arrays):  # during the build: its lock is in its temporary folder, naming this process
        held.extend(p.read_text().split() for p in streams.glob(f".*.tmp{os.getpid()}/build.lock"))
        return real(*arrays)

    monkeypatch.setattr(data_mod, "tokens_digest", digest)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folders = {}
    for name, owner in (
        ("killed", f"{dead.pid} {socket.gethostname()}"),
        ("remote", "1 another-host"),
        ("bare", None),
    ):
        folders[name] = d = streams / f".{name}.tmp{dead.pid}"
        d.mkdir(parents=True)
        (d / "train.bin").write_bytes(b"\0" * 1000)
        if owner:
            (d / "build.lock").write_text(owner + "\n")
    s = build_token_streams(str(corpus_file), vocab_size=300, val_fraction=0.1)
    assert not folders["killed"].exists()
    assert folders["remote"].exists() and folders["bare"].exists()
    assert held and all(owner == [str(os.getpid()), socket.gethostname()] for owner in held)
    assert not (s.cache / "build.lock").exists() and not list(streams.glob(f".*.tmp{os.getpid()}"))


def test_a_live_token_cache_build_whose_pid_is_not_alive_here_is_left_alone(tmp_path):
    """A build in another PID namespace under this host name (containers with the host's network share
    its name) holds its lock's flock, but its PID is not alive here: its folder was removed as a killed
    build's, under the live build."""
    import socket

    from htmuon.train.data import remove_killed_builds

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    d = tmp_path / f".key.tmp{dead.pid}"
    d.mkdir()
    lock = d / "build.lock"
    with flock_held_elsewhere(lock, f"{dead.pid} {socket.gethostname()}"):
        assert remove_killed_builds(tmp_path) == [] and d.exists()
    assert remove_killed_builds(tmp_path) == [d] and not d.exists()  # its holder gone: removed


def test_token_data_reads_windows_of_a_memmap(tmp_path):
    arr = np.arange(1000, dtype=np.uint16)
    arr.tofile(tmp_path / "t.bin")
    mm = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r", shape=(1000,))
    data = TokenData(mm, mm, seq_len=10, batch_size=4, seed=0)
    x, y = data.next_batch()
    assert x.dtype == torch.int64 and x.shape == (4, 10)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y - x, torch.ones_like(x))
    assert all(int(r[0]) % 10 == 0 for r in x)  # non-overlapping blocks


def _hf_tokenizer_folder(tmp_path, corpus_file):
    from transformers import PreTrainedTokenizerFast

    from htmuon.train.tokenizer import EOS, train_tokenizer

    text = corpus_file.read_text()
    tok = train_tokenizer([[text[:50000]]], 350)
    folder = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(str(folder))
    return folder, tok


def test_hf_tokenizer_from_a_local_folder(corpus_file, tmp_path):
    folder, tok = _hf_tokenizer_folder(tmp_path, corpus_file)
    streams = build_token_streams(str(corpus_file), vocab_size=999, val_fraction=0.1, tokenizer=str(folder))
    train_docs = text_splits(str(corpus_file), 0.1).train
    assert np.array_equal(np.asarray(streams.train), encode_docs(tok, train_docs))
    assert streams.vocab_size == tok.get_vocab_size()
    cfg = TrainConfig(**{**TINY_RUN, "data": str(corpus_file), "tokenizer": str(folder)})
    out = train(TrainConfig(**{**vars(cfg), "out_dir": str(tmp_path / "run")}))
    assert out["finished"] and out["info"]["tokenizer"] == str(folder)
    with pytest.raises(UserError, match="tokenizer folder '.*nope' not found"):
        build_token_streams(
            str(corpus_file), vocab_size=300, val_fraction=0.1, tokenizer=str(tmp_path / "nope")
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="tokenizer folder '.*empty' is empty"):
        build_token_streams(
            str(corpus_file), vocab_size=300, val_fraction=0.1, tokenizer=str(tmp_path / "empty")
        )
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load the tokenizer in"):
        build_token_streams(
            str(corpus_file), vocab_size=300, val_fraction=0.1, tokenizer=str(tmp_path / "bad")
        )


def test_jsonl_gz_folder_and_datasets_sources(corpus_file, tmp_path):
    text = corpus_file.read_text()
    docs = [text[i : i + 3000] for i in range(0, 90000, 3000)]
    folder = tmp_path / "shards"
    folder.mkdir()
    for k in range(3):
        with gzip.open(folder / f"c4-train.{k:05d}.json.gz", "wt", encoding="utf-8") as f:
            for d in docs[k::3]:
                f.write(json.dumps({"text": d, "url": "x"}) + "\n")
    s = build_token_streams(str(folder), vocab_size=300, val_fraction=0.1)
    assert len(s.train) > 5 * len(s.val) > 0
    limited = build_token_streams(str(folder), vocab_size=300, val_fraction=0.1, max_docs=5)
    assert len(limited.train) + len(limited.val) < (len(s.train) + len(s.val)) / 3
    eos = sum(int((np.asarray(a) == limited.eos_id).sum()) for a in (limited.train, limited.val))
    assert eos == 5  # one end-of-document per document (each a single chunk), max_docs of them
    no_body = r"c4-train.00000.json.gz:1: no field 'body' \(its fields: 'text', 'url'"
    with pytest.raises(UserError, match=no_body):
        build_token_streams(str(folder), vocab_size=300, val_fraction=0.1, text_field="body")
    datasets = pytest.importorskip("datasets")
    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": docs[:20]}),
            "validation": datasets.Dataset.from_dict({"text": docs[20:23]}),
        }
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    d = build_token_streams(f"hf-disk:{tmp_path / 'ds'}", vocab_size=300, val_fraction=0.1)
    assert 0 < len(d.val) < len(d.train)  # the dataset's own validation split
    # hf-cache: a dataset the datasets library can load offline (here a local json folder)
    c = build_token_streams(f"hf-cache:{folder}", vocab_size=300, val_fraction=0.1)
    assert len(c.train) + len(c.val) == len(s.train) + len(s.val)


def test_hf_cache_reads_only_the_local_cache_and_never_the_network(tmp_path, monkeypatch):
    """hf-cache: is strictly offline: a cached dataset loads with every socket blocked; one that is not
    cached fails at once with a one-line error naming it and the cache (datasets 5 reads
    config.HF_HUB_OFFLINE, not the HF_DATASETS_OFFLINE that was set: it asked huggingface.co, retrying
    for ~28 s, and would have downloaded the dataset); the offline switches are restored afterwards."""
    import socket

    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants as hub

    from htmuon.train.data import iter_documents

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    for module, flag in ((datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE")):
        monkeypatch.setattr(module, flag, False)  # a process with the network allowed
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    # fill the cache as a user would (here from a local folder: the cache entry is named 'toy')
    (tmp_path / "src" / "toy").mkdir(parents=True)
    for split, n in (("train", 20), ("validation", 3)):
        rows = "".join(json.dumps({"text": f"{split} document {i}. " * 40}) + "\n" for i in range(n))
        (tmp_path / "src" / "toy" / f"{split}.jsonl").write_text(rows)
    datasets.load_dataset(str(tmp_path / "src" / "toy"))
    monkeypatch.chdir(tmp_path)  # (no folder 'toy' here: the name is a hub name)

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    splits = [split for split, chunks in iter_documents("hf-cache:toy") if list(chunks)]
    assert splits == ["train"] * 20 + ["val"] * 3  # the dataset's own splits, from the cache
    assert attempts == []  # (the hub was not asked first)
    for name, want in (
        ("htmuon-tests/not-cached", "hf:htmuon-tests/not-cached"),
        ("toy:nosuchconfig", "Available configs in the cache: ['default']"),
    ):
        with pytest.raises(UserError) as info:
            list(iter_documents(f"hf-cache:{name}"))
        msg = str(info.value)
        assert msg.startswith(
            f"dataset '{name}' is not in the local Hugging Face datasets cache ({tmp_path / 'cache'}): "
            "hf-cache: reads only that cache, never the network; fill it once"
        )
        assert want in msg and "\n" not in msg
    assert attempts == []
    # the process is not left offline
    assert (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE) == (
        False,
        False,
        False,
    )


def test_hf_offline_sets_every_switch_and_restores_it(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants as hub

    from htmuon.train.data import hf_offline

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # a user's own offline setting stays
    with pytest.raises(RuntimeError), hf_offline():
        assert datasets.config.HF_HUB_OFFLINE and datasets.config.HF_DATASETS_OFFLINE and hub.HF_HUB_OFFLINE
        raise RuntimeError  # restored on an error too
    assert (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE) == (
        False,
        False,
        True,
    )
    # overlapping blocks (two threads, or nested): offline until the last one leaves, then as before
    # (the first exit once put the switches back while the other block was still loading, and the
    # other's exit then "restored" offline for good)
    a, b = hf_offline(), hf_offline()
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert datasets.config.HF_HUB_OFFLINE and datasets.config.HF_DATASETS_OFFLINE
    b.__exit__(None, None, None)
    assert (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE) == (
        False,
        False,
        True,
    )


# ----------------------------------------------------------------------------- images


def _png_tree(root, n_per_class=3, size=(12, 10)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n_per_class):
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")


def test_imagenet_folder_batches_are_deterministic_and_resumable(tmp_path):
    pytest.importorskip("PIL")
    _png_tree(tmp_path / "inet")
    root, size = parse_imagenet_source(f"imagenet:{tmp_path / 'inet'}@8")
    assert size == 8
    a = ImageFolderData(root, 8, batch_size=4, seed=0)
    assert (a.num_classes, a.n_train, a.n_val, a.in_channels) == (2, 6, 6, 3)
    x, y = a.next_batch()
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and set(y.tolist()) <= {0, 1}
    state = a.sampler.state_dict()
    x2, _ = a.next_batch()
    b = ImageFolderData(root, 8, batch_size=4, seed=0)
    b.sampler.load_state_dict(state)
    assert torch.equal(b.next_batch()[0], x2)  # resumed: the same crops and flips
    vx, vy = next(iter(a.val_batches()))
    assert vx.shape == (4, 3, 8, 8) and vy.tolist() == [0, 0, 0, 1]
    with pytest.raises(UserError, match="lacks 'val/'"):
        (tmp_path / "empty" / "train").mkdir(parents=True)
        parse_imagenet_source(f"imagenet:{tmp_path / 'empty'}")
    (root / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    c = ImageFolderData(root, 8, batch_size=7, seed=0)
    with pytest.raises(UserError, match="cannot decode image '.*broken.png'"):
        c.next_batch()


def test_vit_trains_on_imagenet_folder_and_cifar100_pickles(tmp_path):
    pytest.importorskip("PIL")
    _png_tree(tmp_path / "inet")
    base = {**TINY_RUN, "model": "vit-micro", "batch_size": 4, "eval_batches": 1}
    out = train(TrainConfig(**base, data=f"imagenet:{tmp_path / 'inet'}@8", out_dir=str(tmp_path / "a")))
    assert out["finished"] and out["info"]["classes"] == 2
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 40), ("test", 10)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": list(range(n))}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    data = load_image_data(f"cifar100:{tmp_path}", 8, seed=0)
    assert (data.num_classes, data.image_size, data.n_train) == (100, 32, 40)
    out = train(
        TrainConfig(
            **{**base, "model": "resnet50-micro"}, data=f"cifar100:{tmp_path}", out_dir=str(tmp_path / "b")
        )
    )
    assert out["finished"] and out["info"]["classes"] == 100


def test_cifar_training_batches_are_padded_crops_and_flips(tmp_path):
    from htmuon.train.data import ImageData

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    data = load_image_data(f"cifar10:{tmp_path}", 8, seed=0)
    plain = ImageData(data.x_train, data.y_train, data.x_val, data.y_val, 10, 8, seed=0)
    state = data.sampler.state_dict()
    x, y = data.next_batch()
    xp, yp = plain.next_batch()
    assert torch.equal(y, yp) and not torch.equal(x, xp)
    for a, o in zip(x, xp):  # each image: a 4-pixel-padded crop of its source, maybe mirrored
        padded = torch.nn.functional.pad(o, (4, 4, 4, 4))
        crops = [padded[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
        assert any(torch.equal(a, c) or torch.equal(a, c.flip(-1)) for c in crops)
    data.sampler.load_state_dict(state)
    assert torch.equal(data.next_batch()[0], x)  # resumed: the same crops


# ----------------------------------------------------------------------------- presets


def _plan(argv):
    import argparse

    from htmuon.train import compare

    parser = argparse.ArgumentParser()
    compare.configure(parser)
    return compare.plan_grid(parser.parse_args(argv))


def test_gpu_presets_lay_out_the_papers_experiments(tmp_path):
    cells = _plan(["--preset", "gpu-vit-tiny", "--out-dir", str(tmp_path)]).select_cells()
    by_spec: dict = {}
    for c in cells:
        by_spec.setdefault(c.spec, []).append((c.lr, c.cfg))
    assert set(by_spec) == {"adamw", "muon", "htmuon:p=0.03125"}
    assert sorted(lr for lr, _ in by_spec["htmuon:p=0.03125"]) == [0.003, 0.004, 0.005]
    cfg = by_spec["htmuon:p=0.03125"][0][1]
    assert (cfg.p, cfg.model, cfg.batch_size * cfg.grad_accum) == (0.03125, "vit-tiny", 1024)
    assert by_spec["muon"][0][1].p == 0.0
    cfg = _plan(["--preset", "gpu-gpt2", "--out-dir", str(tmp_path)]).select_cells()[0].cfg
    assert (cfg.model, cfg.seq_len, cfg.batch_size * cfg.grad_accum) == ("gpt2-small", 1024, 480)
    cells = _plan(["--preset", "gpu-resnet50-cifar100", "--out-dir", str(tmp_path)]).select_cells()
    assert {c.cfg.model for c in cells} == {"resnet50"} and {c.seed for c in cells} == {0, 1, 2}


@pytest.mark.parametrize("preset", ["gpt2-cpu", "resnet50-cpu", "vit-cpu"])
def test_cpu_siblings_run(preset, corpus_file, tmp_path):
    from htmuon.cli import main as cli_main

    argv = ["compare", "--preset", preset, "--seeds", "0", "--steps", "2", "--warmup-steps", "1"]
    argv += ["--eval-every", "2", "--eval-batches", "1", "--progress", "none", "--no-alpha"]
    if preset == "gpt2-cpu":
        argv += ["--data", str(corpus_file), "--vocab-size", "320", "--seq-len", "16", "--batch-size", "2"]
    assert cli_main([*argv, "--out-dir", str(tmp_path / preset)]) == 0
    from htmuon.train.presets import RUN_PRESETS

    # every optimizer of the preset trained its 2 steps and has a finite result
    res = json.loads((tmp_path / preset / "results.json").read_text())
    md = (tmp_path / preset / "results.md").read_text()
    specs = set(RUN_PRESETS[preset].optimizers)
    assert {r["spec"] for r in res["runs"]} == specs and len(res["runs"]) == len(specs)
    for r in res["runs"]:
        assert r["finished"] and not r.get("diverged") and r["steps_done"] == 2, r
        assert math.isfinite(r["final_val_loss"]), r
        if preset != "gpt2-cpu":
            assert 0.0 <= r["final_val_acc"] <= 1.0, r
        assert f"| {r['spec']} |" in md


def test_a_token_cache_build_shows_progress_when_it_takes_long(corpus_file, tmp_path, monkeypatch, capsys):
    """A long build (hours for a large corpus) prints progress lines to stderr; a quick one (here,
    with the default period) prints nothing."""
    import htmuon.train.data as data_mod

    monkeypatch.setenv("HTMUON_CACHE", str(tmp_path / "quiet"))
    build_token_streams(str(corpus_file), vocab_size=300, val_fraction=0.1)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("HTMUON_CACHE", str(tmp_path / "shown"))
    monkeypatch.setattr(data_mod, "BUILD_PROGRESS_S", 0.0)
    streams = build_token_streams(str(corpus_file), vocab_size=300, val_fraction=0.1)
    lines = capsys.readouterr().err.splitlines()
    assert any(": training the tokenizer: " in ln for ln in lines)
    assert any(": tokenising: " in ln for ln in lines)
    total = len(streams.train) + len(streams.val)
    assert lines[-1].startswith(f"token cache for '{corpus_file}': tokenised: ")
    assert f"M characters, {total:,} tokens (" in lines[-1]


# ----------------------------------------------------------------------------- a user's own data


def _streams(path, **kw):
    s = build_token_streams(str(path), vocab_size=300, val_fraction=0.1, **kw)
    return np.asarray(s.train), np.asarray(s.val)


def test_bom_crlf_and_a_json_file_are_read_as_their_text(corpus_file, tmp_path):
    """A byte-order mark is not text (it was tokenised into the first document; a JSONL file starting
    with one failed on line 1), CRLF line ends read as LF, and a single .json file (an uncompressed C4
    shard) is read as JSON lines (it was tokenised as text, braces and "text": keys included)."""
    text = corpus_file.read_text()[:40000]
    (tmp_path / "plain.txt").write_text(text, encoding="utf-8")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "crlf.txt").write_bytes(text.replace("\n", "\r\n").encode())
    plain = _streams(tmp_path / "plain.txt")
    for name in ("bom.txt", "crlf.txt"):
        got = _streams(tmp_path / name)
        assert all(np.array_equal(a, b) for a, b in zip(got, plain)), name
    lines = "".join(json.dumps({"text": text[i : i + 4000]}) + "\n" for i in range(0, len(text), 4000))
    (tmp_path / "docs.jsonl").write_text(lines, encoding="utf-8")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    (tmp_path / "docs.json").write_text(lines, encoding="utf-8")
    jsonl = _streams(tmp_path / "docs.jsonl")
    for name in ("bom.jsonl", "docs.json"):
        got = _streams(tmp_path / name)
        assert all(np.array_equal(a, b) for a, b in zip(got, jsonl)), name


@pytest.mark.parametrize(
    "line, error",
    [
        ('{"body": "x", "id": 3}', r":2: no field 'text' \(its fields: 'body', 'id'; use --text-field\)"),
        ('{"text": 5}', r":2: field 'text' is a number, not a string"),
        ('{"text": ["a", "b"]}', r":2: field 'text' is an array, not a string"),
        ('["a"]', r":2: expected a JSON object, got an array"),
        ('{"text": "a"', r":2: not valid JSON"),
    ],
)
def test_a_bad_jsonl_line_is_an_error_naming_file_line_and_value(tmp_path, line, error):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=f"^{path}{error}"):
        _streams(path)


def test_a_data_folder_skips_hidden_files_and_follows_symlinked_folders(corpus_file, tmp_path):
    """Hidden files and folders are not data: macOS's ._NAME resource forks (binary: the run failed)
    and .ipynb_checkpoints/ copies (the same text twice, possibly in train and in validation). A
    symlinked folder is read (it was skipped silently), once even if linked twice or in a loop."""
    from htmuon.train.data import _local_files

    text = corpus_file.read_text()
    folder, outside = tmp_path / "data", tmp_path / "elsewhere"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    outside.mkdir()
    (folder / "a.txt").write_text(text[:30000])
    (folder / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text(text[:30000])
    (folder / "._a.txt").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X\xff\xfe")
    (outside / "b.txt").write_text(text[30000:60000])
    (folder / "more").symlink_to(outside, target_is_directory=True)
    (outside / "loop").symlink_to(folder, target_is_directory=True)
    assert _local_files(str(folder)) == [folder / "a.txt", folder / "more" / "b.txt"]
    tr, va = _streams(folder)
    (tmp_path / "ab.txt").write_text(text[:60000])
    one = _streams(tmp_path / "ab.txt")
    assert len(tr) + len(va) > 0.9 * (len(one[0]) + len(one[1]))  # both files read, each once


def test_datasets_rows_whose_text_is_not_a_string_are_an_error(tmp_path):
    """A text field holding numbers or lists skipped every row silently (then 'empty'); a missing
    value (None) is skipped."""
    datasets = pytest.importorskip("datasets")
    from htmuon.train.data import iter_documents

    ds = datasets.Dataset.from_dict(
        {"text": ["one document.", None, "another one."], "ids": [[1], [2], [3]], "n": [1, 2, 3]}
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    src = f"hf-disk:{tmp_path / 'ds'}"
    assert ["".join(c) for _, c in iter_documents(src)] == ["one document.", "another one."]
    for field, kind in (("ids", "list"), ("n", "int")):
        bad = f"field '{field}' of row 0 of split 'train' is a {kind}, not text"
        with pytest.raises(UserError, match=bad):
            list(iter_documents(src, text_field=field))


def _cifar10(root, data, labels):
    root.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)


@pytest.mark.parametrize(
    "case, error",
    [
        ("hwc", r"'data' has shape \(6, 32, 32, 3\), expected \(N, 3072\)"),
        ("width", r"'data' has shape \(6, 1000\), expected \(N, 3072\)"),
        ("empty", r"'data' has shape \(0, 3072\), expected \(N, 3072\), N >= 1"),
        ("float", r"'data' holds float32 values, expected bytes 0..255"),
        ("wide", r"'data' holds the value 256, expected bytes 0..255"),
        ("few", r"'labels' has shape \(4,\) \(int64\), expected 6 integer labels"),
        ("column", r"'labels' has shape \(6, 1\) \(int64\), expected 6 integer labels"),
        ("range", r"label 10 in 'labels' is outside 0..9"),
        ("negative", r"label -1 in 'labels' is outside 0..9"),
    ],
)
def test_cifar_batches_of_another_shape_type_or_labels_are_named_errors(tmp_path, case, error):
    """The python-pickle batches are checked: an N x 32 x 32 x 3 array was reinterpreted as channels
    first, floats in [0, 1] cast to bytes (all 0), labels outside the classes or fewer than the images
    crashed in the middle of training; another width was a traceback."""
    rng = np.random.default_rng(0)
    data, labels = rng.integers(0, 256, (6, 3072), dtype=np.uint8), [0, 1, 2, 3, 4, 5]
    data, labels = {
        "hwc": (data.reshape(6, 32, 32, 3), labels),
        "width": (data[:, :1000], labels),
        "empty": (data[:0], []),
        "float": (data.astype(np.float32) / 255, labels),
        "wide": (np.where(np.arange(3072) == 7, 256, data.astype(np.int64)), labels),
        "few": (data, labels[:4]),
        "column": (data, np.asarray(labels)[:, None]),
        "range": (data, [0, 1, 2, 3, 4, 10]),
        "negative": (data, [0, 1, 2, 3, 4, -1]),
    }[case]
    _cifar10(tmp_path / "cifar-10-batches-py", data, labels)
    with pytest.raises(UserError, match=f"^CIFAR batch '.*data_batch_1': {error}"):
        load_image_data(f"cifar10:{tmp_path}", 4, seed=0)


def test_imagenet_folder_skips_hidden_entries_and_reads_class_folders_recursively(tmp_path):
    """A hidden folder (.ipynb_checkpoints) became a class (labels shifted, one output more), a ._NAME
    resource fork an image (a decode error hours into training); images in a class's subfolders were
    skipped (torchvision's ImageFolder reads them). A train class without images is an error."""
    pytest.importorskip("PIL")
    from PIL import Image

    root = tmp_path / "inet"
    _png_tree(root)
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 not a png")
    (root / "train" / "dog" / "more").mkdir()
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "train" / "dog" / "more" / "x.png")
    data = ImageFolderData(root, 8, batch_size=7, seed=0)
    assert (data.classes, data.n_train, data.n_val) == (["cat", "dog"], 7, 6)
    assert data.train_items[-1] == (root / "train" / "dog" / "more" / "x.png", 1)
    data.next_batch()  # every training image decodes
    (root / "train" / "bird").mkdir()
    with pytest.raises(UserError, match=f"class folder '{root / 'train' / 'bird'}' holds no images"):
        ImageFolderData(root, 8, batch_size=4, seed=0)


def test_a_token_cache_folder_without_its_meta_json_is_named(corpus_file, tmp_path):
    """A cache folder that lost meta.json (only a complete folder is renamed into place) was reported as
    'cannot write the token cache ... Directory not empty (set HTMUON_CACHE)' after a full rebuild."""
    path = tmp_path / "c.txt"
    path.write_text(corpus_file.read_text()[:30000])
    s = build_token_streams(str(path), vocab_size=300, val_fraction=0.1)
    (s.cache / "meta.json").unlink()
    missing = f"'{s.cache / 'meta.json'}' is unusable \\(missing\\); delete its folder"
    with pytest.raises(UserError, match=missing):
        build_token_streams(str(path), vocab_size=300, val_fraction=0.1)


def test_a_split_shorter_than_one_sequence_names_its_length():
    tokens = np.arange(50, dtype=np.uint16)
    with pytest.raises(
        UserError, match=r"the validation split \(8 tokens\) is smaller than one sequence of --seq-len 10"
    ):
        TokenData(tokens, tokens[:8], seq_len=10, batch_size=4, seed=0)
    with pytest.raises(
        UserError, match=r"the training split \(10 tokens\) is smaller than one sequence of --seq-len 10"
    ):
        TokenData(tokens[:10], tokens, seq_len=10, batch_size=4, seed=0)
    assert TokenData(tokens[:11], tokens[:11], seq_len=10, batch_size=4, seed=0).next_batch()[0].shape == (
        4,
        10,
    )


@pytest.mark.parametrize("name", ["shard.txt.gz", "shard.jsonl.gz"])
def test_a_truncated_gz_file_is_an_error_naming_it(corpus_file, tmp_path, name):
    """A .gz cut short (an interrupted download of a C4 shard) was an EOFError traceback."""
    text = corpus_file.read_text()[:60000]
    if name.endswith(".jsonl.gz"):
        text = "".join(json.dumps({"text": text[i : i + 2000]}) + "\n" for i in range(0, len(text), 2000))
    packed = gzip.compress(text.encode())
    (tmp_path / name).write_bytes(packed[: len(packed) // 2])
    with pytest.raises(UserError, match=f"^data file '.*{name}' is damaged or truncated \\(EOFError: "):
        _streams(tmp_path / name)


def test_a_val_fraction_above_one_half_is_refused(corpus_file):
    """Every round(1/f)-th chunk is held out, at least every 2nd: 0.7 held out 0.5, silently."""
    for bad in (0.7, 0.0, 1.0):
        with pytest.raises(UserError, match=f"val_fraction must be in \\(0, 0.5\\] .*got {bad}"):
            build_token_streams(str(corpus_file), vocab_size=300, val_fraction=bad)
    s = build_token_streams(str(corpus_file), vocab_size=300, val_fraction=0.5)
    assert abs(len(s.val) / (len(s.train) + len(s.val)) - 0.5) < 0.05


# ----------------------------------------------------------------------------- splits and sampling


def test_holdout_period_is_the_nearest_integer_to_one_over_val_fraction(tmp_path):
    """Every round(1 / val_fraction)-th chunk is held out: 0.15 -> every 7th (held out 1/7 = 0.143),
    not every 6th (0.167, truncating 6.67)."""
    doc = ("a" * 8191 + "\n") * 70  # 70 chunks of CHUNK_CHARS = 8192 characters
    assert len(chunk_document(doc)) == 70
    (tmp_path / "doc.txt").write_text(doc)
    for fraction, held in ((0.15, 10), (0.3, 23), (0.1, 7), (0.5, 35)):
        s = text_splits(str(tmp_path / "doc.txt"), fraction)
        assert sum(map(len, s.val)) == held and sum(map(len, s.train)) == 70 - held, fraction


def test_block_sampler_draws_a_new_order_each_epoch_and_resumes_in_any_epoch():
    from htmuon.train.data import BlockSampler

    s = BlockSampler(50, 10, seed=3)
    batches = [s.next_indices() for _ in range(12)]
    epochs = np.concatenate(batches[:5]), np.concatenate(batches[5:10])
    assert all(sorted(e.tolist()) == list(range(50)) for e in epochs)  # each epoch covers every block
    assert not np.array_equal(*epochs)  # a fresh permutation per epoch
    assert not np.array_equal(BlockSampler(50, 10, seed=4).next_indices(), batches[0])  # per seed
    s = BlockSampler(50, 10, seed=3)
    for _ in range(7):  # into epoch 1
        s.next_indices()
    state = s.state_dict()
    assert (state["epoch"], state["index"]) == (1, 20)
    resumed = BlockSampler(50, 10, seed=3)
    resumed.load_state_dict(state)
    assert all(np.array_equal(resumed.next_indices(), b) for b in batches[7:])
    for other in (BlockSampler(50, 10, seed=4), BlockSampler(49, 10, seed=3)):
        with pytest.raises(UserError, match="data position does not match"):
            other.load_state_dict(state)


def test_token_windows_stay_inside_the_stream_and_validation_windows_rotate():
    """A stream of 4 * seq_len tokens holds 3 training windows (each needs one more token for its
    targets), all drawn, none past the end; ``val_batches(max_batches, window)`` takes consecutive
    windows from ``window * max_batches * batch_size``, wrapping around."""
    tokens = np.arange(40, dtype=np.uint16)
    val = np.arange(1000, 1101, dtype=np.uint16)  # 10 windows of 10
    data = TokenData(tokens, val, seq_len=10, batch_size=2, seed=0)
    assert data.sampler.n == 3
    starts = set()
    for _ in range(6):  # four epochs
        x, y = data.next_batch()
        assert torch.equal(y, x + 1)
        starts |= {int(v) for v in x[:, 0]}
    assert starts == {0, 10, 20}

    def firsts(**kw):
        return [int(v) - 1000 for x, _ in data.val_batches(**kw) for v in x[:, 0]]

    assert firsts() == list(range(0, 100, 10))
    assert firsts(max_batches=1, window=0) == [0, 10]
    assert firsts(max_batches=1, window=1) == [20, 30]
    assert firsts(max_batches=3, window=1) == [60, 70, 80, 90, 0, 10]
    exact = TokenData(tokens, val[:100], seq_len=10, batch_size=4, seed=0)  # 100 tokens: 9 windows
    assert [int(v) for x, _ in exact.val_batches() for v in x[:, 0]] == list(range(1000, 1090, 10))
    from htmuon.train.data import ImageData

    x = torch.zeros(10, 1, 2, 2)
    img = ImageData(x[:4], torch.arange(4), x, torch.arange(10), 10, batch_size=2, seed=0)
    labels = [int(v) for _, y in img.val_batches(max_batches=3, window=1) for v in y]
    assert labels == [6, 7, 8, 9, 0, 1]


def test_image_augmentation_differs_per_batch_and_val_uses_train_statistics(tmp_path):
    """CIFAR crops and flips are drawn per (seed, epoch, position): two batches of one epoch of the same
    image get different crops. Both splits are normalised with the training split's channel mean and
    std. The digits split is fixed, whatever the run's seed."""
    from htmuon.train.data import ImageData

    g = torch.Generator().manual_seed(0)
    one = torch.randn(1, 3, 8, 8, generator=g)
    data = ImageData(one.expand(16, -1, -1, -1), torch.zeros(16, dtype=torch.long), one, torch.zeros(1),
                     10, batch_size=8, seed=0, augment=True)  # fmt: skip
    a, b = data.next_batch()[0], data.next_batch()[0]
    assert not torch.equal(a, b)
    padded = torch.nn.functional.pad(one[0], (4, 4, 4, 4))
    crops = [padded[:, i : i + 8, j : j + 8] for i in range(9) for j in range(9)]
    flipped = [not any(torch.equal(x, c) for c in crops) for x in torch.cat([a, b])]
    assert 0 < sum(flipped) < 16  # some mirrored, some not (p = 1/2 each)

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(2)
    raw = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        raw[name] = rng.integers(0, 256, (4, 3072), dtype=np.uint8) // (2 if name == "test_batch" else 1)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": raw[name], b"labels": [0, 1, 2, 3]}, f)
    data = load_image_data(f"cifar10:{tmp_path}", 8, seed=0)
    tr = np.concatenate([raw[f"data_batch_{i}"] for i in range(1, 6)]).reshape(-1, 3, 32, 32) / 255.0
    va = raw["test_batch"].reshape(-1, 3, 32, 32) / 255.0
    mean, std = tr.mean(axis=(0, 2, 3), keepdims=True), tr.std(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(data.x_val.numpy(), (va - mean) / std, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(data.x_train.numpy(), (tr - mean) / std, rtol=1e-4, atol=1e-4)

    pytest.importorskip("sklearn")
    d0, d1 = load_image_data("digits", 8, seed=0), load_image_data("digits", 8, seed=1)
    assert torch.equal(d0.x_val, d1.x_val) and torch.equal(d0.y_val, d1.y_val)


def test_imagenet_crops_are_drawn_per_image(tmp_path):
    """Each image of a batch gets its own random resized crop and flip ((seed, epoch, position + i)):
    copies of one picture come out different."""
    pytest.importorskip("PIL")
    from PIL import Image

    arr = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(arr).save(tmp_path / split / c / f"{i}.png")
    data = ImageFolderData(tmp_path, 8, batch_size=8, seed=0, workers=1)
    x, _ = data.next_batch()
    assert len({x[i].numpy().tobytes() for i in range(8)}) > 4
    # validation: the shorter side resized to round(8 / 0.875) = 9 (here: as it is), a centre crop
    tall = np.random.default_rng(1).integers(0, 256, (18, 9, 3), dtype=np.uint8)  # 9 wide, 18 high
    for f in (tmp_path / "val").rglob("*.png"):
        Image.fromarray(tall).save(f)
    vx, _ = next(iter(data.val_batches(max_batches=1)))
    mean, std = np.asarray([0.485, 0.456, 0.406]), np.asarray([0.229, 0.224, 0.225])
    want = (tall[5:13, 0:8].transpose(2, 0, 1) / 255.0 - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(vx[0].numpy(), want, atol=1e-5)


def test_the_token_cache_is_keyed_by_the_split(corpus_file, tmp_path, monkeypatch):
    """A cache built for one val_fraction is not reused for another (it would train on another split)."""
    monkeypatch.setenv("HTMUON_CACHE", str(tmp_path / "cache"))
    a = build_token_streams(str(corpus_file), vocab_size=300, val_fraction=0.1)
    b = build_token_streams(str(corpus_file), vocab_size=300, val_fraction=0.05)
    assert a.cache != b.cache
    assert len(b.val) / (len(b.train) + len(b.val)) < 0.75 * len(a.val) / (len(a.train) + len(a.val))


def test_an_edited_corpus_file_of_the_same_size_gets_a_new_token_cache(tmp_path, monkeypatch):
    """The cache key holds each file's modification time as well as its size: an edit that keeps the
    size (a typo fixed) is tokenised again, not served from the old cache."""
    import os

    monkeypatch.setenv("HTMUON_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "c.txt"
    text = "".join(f"line {i} of the corpus, to be or not to be\n" for i in range(3000))
    path.write_text(text)
    a = build_token_streams(str(path), vocab_size=300, val_fraction=0.1)
    path.write_text(text.replace("to be or not", "tu be ur nut"))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    b = build_token_streams(str(path), vocab_size=300, val_fraction=0.1)
    assert b.cache != a.cache and b.digest != a.digest


def test_the_in_memory_token_cache_is_keyed_by_both_splits_and_checks_its_ids(
    corpus_file, tmp_path, monkeypatch
):
    """prepare_tokens' cache key covers the validation text too (the same train split with another
    validation split is another cache), and a cached stream holding an id equal to the vocabulary size
    (one past the last) is refused, naming the file."""
    from htmuon.train.data import TextSplits
    from htmuon.train.tokenizer import corpus_key

    monkeypatch.setenv("HTMUON_CACHE", str(tmp_path / "cache"))
    splits = text_splits(str(corpus_file), 0.1)
    other = TextSplits(splits.train, [["another validation text\n"]])
    assert corpus_key(splits, 300) != corpus_key(other, 300) != corpus_key(other, 400)
    tok, tr, va, d = prepare_tokens(splits, 300)
    _, _, va2, d2 = prepare_tokens(other, 300)
    assert d2 != d and not np.array_equal(va2, va)
    bad = va.copy()
    bad[3] = tok.get_vocab_size()
    np.save(d / "val.npy", bad)
    with pytest.raises(UserError, match=r"token cache file '.*val.npy' is unusable \(token ids outside"):
        prepare_tokens(splits, 300)
