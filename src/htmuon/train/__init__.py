"""The reproduction harness: LLaMA pretraining and image classification with AdamW, Muon and HTMuon.

Command line: ``htmuon train`` (one run) and ``htmuon compare`` (optimizers x seeds x lrs); see
docs/harness.md. From Python::

    from htmuon.train.config import make_config
    from htmuon.train.loop import train

    summary = train(make_config({"optimizer": "htmuon", "steps": 100, "out_dir": "runs/x"}))

Needs ``pip install htmuon[train]`` (transformers, tokenizers, tqdm, scikit-learn, matplotlib);
the modules import them lazily.
"""
