"""The TAWT paper's sample-weighted setting (App. B, Fig. 2) on word-level tasks built here.

The paper weights 1,000 source examples (OntoNotes POS of entity words) for a 100-example
target (entity type of entity words) with a two-layer network (4,096 hidden units, ReLU,
cross-entropy) on 5-gram word features (50-d GloVe), Adam 3e-4, batch 128, 200 epochs, the
sample weights updated every 5 epochs (40 updates) by mirror descent with the identity
approximation of eq. 2.7's Hessian (g_i = -c grad l_i . v, c = 5, eta = 1).

Neither OntoNotes nor GloVe is available here, so:

- examples are words in context: every word (``--words all``, default), or *entity-like
  words* (``--words entity``: capitalised, alphabetic, not sentence-initial — the paper's
  choice, but here 85 % of them are NNP in the WSJ test split and every run predicts NNP);
- source: their Brown POS tag (``brown.pos`` base tags), ``--source`` words from Brown's
  training split, ``--corrupt`` of them with a random other tag of the source's tag set (so
  the weights have something known to find);
- target: their Penn tag in the WSJ sample (``wsj-pos.pos``), ``--target`` words for
  training, every word of the WSJ test split for testing;
- features: the 5-word window around the word (2 left, 2 right, zeros past the sentence's
  ends), each word the mean of MiniLM's *frozen input embeddings* (``word_embeddings``) of its
  sub-words: 5 x 384 = 1,920 inputs.

The network is the paper's: phi = Linear(1920, 4096) + ReLU (the representation, whose
per-example gradient products ``SampleGradientProducts`` measures), one Linear head per task.
Runs per seed, all with the same data, network initialisation and batches: target only,
joint training (target and source share 1/2 each, every source example the same), and
sample-weighted joint training (the same with ``tawt-samples``' weights,
:class:`pyxtask.methods.sample_tawt.SampleWeights`). ``pyxtask train`` trains BERT-type
encoders, not this network, hence a script. Results: ``--out`` (``results.json``,
``results.md``, ``weights.png``).

    .venv/bin/python benchmarks/sample_tawt_mlp.py                  # the paper's settings
    .venv/bin/python benchmarks/sample_tawt_mlp.py --epochs 20 --update-every 5 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

WINDOW = 2  # words each side


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=int, default=1000, help="source examples (paper: 1000)")
    p.add_argument("--target", type=int, default=100, help="target examples (paper: 100)")
    p.add_argument(
        "--words", default="all", choices=("all", "entity"), help="which words are examples"
    )
    p.add_argument("--corrupt", type=float, default=0.3, help="source examples relabelled")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--update-every", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--similarity", default="dot", choices=("dot", "cosine"))
    p.add_argument("--c", type=float, default=5.0)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="benchmarks/results/sample-tawt-mlp")
    return p.parse_args()


# ----------------------------------------------------------------------------- data


def words_of(sentences: list[Any], kind: str) -> list[tuple[Any, int]]:
    """(sentence, position) of every word (``"all"``), or of every capitalised alphabetic word
    that does not start its sentence (``"entity"``)."""
    return [
        (s, k)
        for s in sentences
        for k, w in enumerate(s.words)
        if kind == "all" or (k > 0 and w[:1].isupper() and w.isalpha())
    ]


class Featurizer:
    """Frozen MiniLM input embeddings, averaged over each word's sub-words; 5-word windows."""

    def __init__(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from pyxtask.models import default_encoder_path

        path = default_encoder_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        encoder = AutoModel.from_pretrained(path)
        self.table = encoder.get_input_embeddings().weight.detach().clone()
        self.cache: dict[str, torch.Tensor] = {}

    def word(self, w: str) -> Any:
        if w not in self.cache:
            ids = self.tokenizer(w, add_special_tokens=False)["input_ids"] or [0]
            self.cache[w] = self.table[ids].mean(0)
        return self.cache[w]

    def __call__(self, examples: list[tuple[Any, int]]) -> Any:
        import torch

        zero = torch.zeros(self.table.shape[1])
        rows = []
        for s, k in examples:
            window = [
                self.word(s.words[j]) if 0 <= j < len(s.words) else zero
                for j in range(k - WINDOW, k + WINDOW + 1)
            ]
            rows.append(torch.cat(window))
        return torch.stack(rows)


def build(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Features and labels of the source, target-train and target-test words."""
    import torch

    from pyxtask.config import TrainConfig
    from pyxtask.tasks import load_tasks

    config = TrainConfig(
        target="wsj-pos.pos", sources=["brown.pos"], target_size=None, source_size=4000,
        test_size=None, encoder="tiny", seed=seed,
    )  # fmt: skip
    target, source = load_tasks(config)
    rng = random.Random(seed)
    src = rng.sample(words_of(source.train, args.words), args.source)
    tgt = rng.sample(words_of(target.train, args.words), args.target)
    test = words_of(target.test, args.words)
    featurize = Featurizer()
    src_tags = sorted({s.tags[k] for s, k in src})
    tgt_tags = sorted({s.tags[k] for s, k in tgt})
    tgt_index = {t: i for i, t in enumerate(tgt_tags)}
    y_src = torch.tensor([src_tags.index(s.tags[k]) for s, k in src])
    corrupted = torch.zeros(len(src), dtype=torch.bool)
    for i in rng.sample(range(len(src)), round(args.corrupt * len(src))):
        y_src[i] = rng.choice([j for j in range(len(src_tags)) if j != int(y_src[i])])
        corrupted[i] = True
    unseen = sum(s.tags[k] not in tgt_index for s, k in test)  # -1: always counted wrong
    return {
        "x_src": featurize(src), "y_src": y_src, "corrupted": corrupted,
        "x_tgt": featurize(tgt), "y_tgt": torch.tensor([tgt_index[s.tags[k]] for s, k in tgt]),
        "x_test": featurize(test),
        "y_test": torch.tensor([tgt_index.get(s.tags[k], -1) for s, k in test]),
        "source_tags": src_tags, "target_tags": tgt_tags, "test_unseen_tags": unseen,
    }  # fmt: skip


# ----------------------------------------------------------------------------- training


def train(args: argparse.Namespace, data: dict[str, Any], seed: int, mode: str) -> dict[str, Any]:
    """``mode``: ``"target"``, ``"joint"`` or ``"weighted"`` (sample-weighted joint)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from pyxtask.methods.sample_tawt import SampleWeights, sample_similarities
    from pyxtask.sample_gradients import SampleGradientProducts

    torch.manual_seed(seed)
    d_in = data["x_src"].shape[1]
    phi = nn.Sequential(nn.Linear(d_in, args.hidden), nn.ReLU())
    heads = [nn.Linear(args.hidden, len(data["target_tags"])),
             nn.Linear(args.hidden, len(data["source_tags"]))]  # fmt: skip
    params = [*phi.parameters(), *heads[0].parameters(), *heads[1].parameters()]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    xs = [data["x_tgt"], data["x_src"]]
    ys = [data["y_tgt"], data["y_src"]]
    n0, n1 = len(ys[0]), len(ys[1])
    tasks = [0] if mode == "target" else [0, 1]
    n_all = sum(len(ys[t]) for t in tasks)
    omega0 = 1.0 if mode == "target" else 0.5  # normalized joint: each task half
    weights = SampleWeights([n1], "uniform", ["source"])
    products = SampleGradientProducts(phi, layers="linear")
    g = torch.Generator().manual_seed(seed)
    history, seconds = [], 0.0

    def losses(t: int, idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(heads[t](phi(xs[t][idx])), ys[t][idx], reduction="none")

    for epoch in range(args.epochs):
        batches = [(t, b) for t in tasks
                   for b in torch.randperm(len(ys[t]), generator=g).split(args.batch)]  # fmt: skip
        for k in torch.randperm(len(batches), generator=g).tolist():
            t, idx = batches[k]
            if t == 0:
                factor = torch.full((len(idx),), omega0 * n_all / n0)
            else:
                factor = weights.p[idx].float() * ((1 - omega0) * n_all)
            loss = (factor * losses(t, idx)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if mode == "weighted" and (epoch + 1) % args.update_every == 0:
            started = time.perf_counter()
            target_loss = losses(0, torch.arange(n0)).mean()
            grads = torch.autograd.grad(target_loss, list(phi.parameters()))
            v = {n: x for (n, _), x in zip(phi.named_parameters(), grads, strict=True)}
            dots, sq = products.measure(lambda: losses(1, torch.arange(n1)), v)
            v_norm = math.sqrt(sum(float((x.double() ** 2).sum()) for x in v.values()))
            s = sample_similarities(dots, sq, v_norm, args.similarity)
            weights.update(s, args.c, args.eta)
            seconds += time.perf_counter() - started
            history.append(auroc_record(weights, data["corrupted"], dots, epoch + 1))
    with torch.no_grad():
        predicted = heads[0](phi(data["x_test"])).argmax(1)
    return {
        "test_accuracy": float((predicted == data["y_test"]).float().mean()),
        "updates": history,
        "update_seconds": seconds,
        "weights": weights.p if mode == "weighted" else None,
    }


def auroc_record(weights: Any, corrupted: Any, dots: Any, epoch: int) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    rel = weights.relative()
    return {
        "epoch": epoch,
        "auroc": float(roc_auc_score((~corrupted).numpy(), weights.p.numpy())),
        "dots_median_abs": float(dots.abs().median()),
        "dots_max_abs": float(dots.abs().max()),
        "corrupted_share": float(weights.p[corrupted].sum()),
        "relative_quantiles": [float(x) for x in rel.quantile(rel.new_tensor([0.01, 0.5, 0.99]))],
    }


# ----------------------------------------------------------------------------- report


def figure(results: dict[str, Any], data: dict[str, Any], path: Path) -> None:
    import numpy as np

    from pyxtask.plots import _new_figure, _save

    fig = _new_figure(11, 3.4)
    left, mid, right = fig.subplots(1, 3)
    for seed, r in results["seeds"].items():
        ups = r["weighted"]["updates"]
        left.plot([u["epoch"] for u in ups], [u["auroc"] for u in ups], label=f"seed {seed}")
        mid.plot([u["epoch"] for u in ups], [u["corrupted_share"] for u in ups])
    left.set_ylim(0.4, 1.0)
    left.set_xlabel("epoch")
    left.set_ylabel("AUROC of weight vs cleanness")
    left.legend(fontsize=8)
    mid.set_xlabel("epoch")
    mid.set_ylabel("weight share of the relabelled examples")
    mid.axhline(float(data["corrupted"].float().mean()), color="0.5", lw=0.6)
    last = results["seeds"][min(results["seeds"])]["weighted"]["weights"]
    rel = np.log10((last * len(last)).clamp(min=1e-12).numpy())
    bad = data["corrupted"].numpy()
    bins = np.linspace(rel.min(), rel.max(), 50)
    right.hist(rel[~bad], bins=bins, alpha=0.6, label="clean")
    right.hist(rel[bad], bins=bins, alpha=0.6, label="relabelled")
    right.set_xlabel("log10 p_i·N after the last update (first seed)")
    right.legend(fontsize=8)
    fig.suptitle("two-layer network on MiniLM-embedding 5-grams: Brown POS -> WSJ Penn tags",
                 fontsize=10)  # fmt: skip
    _save(fig, path)


def main() -> None:
    args = parse()
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"settings": vars(args), "seeds": {}}
    data: dict[str, Any] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        data = build(args, seed)
        runs = {}
        for mode in ("target", "joint", "weighted"):
            started = time.perf_counter()
            runs[mode] = train(args, data, seed, mode)
            runs[mode]["seconds"] = time.perf_counter() - started
            print(f"seed {seed} {mode}: test accuracy {100 * runs[mode]['test_accuracy']:.2f} "
                  f"({runs[mode]['seconds']:.0f} s)", flush=True)  # fmt: skip
        results["seeds"][seed] = runs
        results["data"] = {k: data[k] for k in ("source_tags", "target_tags", "test_unseen_tags")}
        results["data"]["test_words"] = len(data["y_test"])
        majority = int(data["y_tgt"].mode().values)
        runs["majority"] = {"test_accuracy": float((data["y_test"] == majority).float().mean())}
    figure(results, data, out / "weights.png")
    for r in results["seeds"].values():
        r["weighted"]["weights"] = None  # the vector is in the plot, not the JSON
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results) + "\n")
    print(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    seeds = results["seeds"]
    lines = ["| seed | majority tag | target only | joint | sample-weighted joint | AUROC (last "
             "update) | relabelled share (start -> end) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for seed, r in seeds.items():
        last = r["weighted"]["updates"][-1]
        lines.append(
            f"| {seed} | {100 * r['majority']['test_accuracy']:.2f} | "
            f"{100 * r['target']['test_accuracy']:.2f} | "
            f"{100 * r['joint']['test_accuracy']:.2f} | "
            f"{100 * r['weighted']['test_accuracy']:.2f} | {last['auroc']:.3f} | "
            f"{results['settings']['corrupt']:.2f} -> {last['corrupted_share']:.3f} |"
        )
    first = next(iter(seeds.values()))["weighted"]["updates"]
    lines.append("")
    lines.append(
        f"Raw dot products grad l_i . v (first seed): median |.| {first[0]['dots_median_abs']:.3g} "
        f"at the first update, {first[-1]['dots_median_abs']:.3g} at the last; max |.| "
        f"{max(u['dots_max_abs'] for u in first):.3g}."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
