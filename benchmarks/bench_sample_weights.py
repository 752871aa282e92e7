"""Cost of a sample-weight update, side by side: per-sample ``grad l_i . V`` and
``||grad l_i||^2`` over N source sentences, against one plain training pass over them.

All in one run, on the same batches (MiniLM, all-MiniLM-L6-v2 with its real weights, a token
head; Brown POS sentences, batch 32, padded to each batch's longest):

- ``plain pass``: forward + ``loss.sum().backward()`` — one training pass (the yardstick);
- ``products (update pass)``: :meth:`SampleGradientProducts.measure` — forward and a backward
  that forms only the layers' output gradients, dots with V and squared norms;
- ``products (in the training step)``: the plain pass with :meth:`capture` around it;
- ``Opacus ghost norms``: Opacus 1.6's fast-gradient-clipping module (ghost clipping), forward
  + backward + ``get_norm_sample()`` — norms only, the best peer;
- ``vmap reference``: per-sample gradients by ``torch.func.vmap(grad)`` (in chunks of 4
  samples), then their dots and norms — timed on the first ``--vmap-batches`` batches and
  scaled to N.

V is a target gradient (Penn Treebank POS, WSJ). Timing is CPU time of the process on one
thread (``time.process_time``; this machine is shared, and CPU time is what a busy neighbour
disturbs least), wall time beside it; each batch runs every contender in rotating order,
``--rounds`` times, and the median round counts. Peak memory: each contender runs over 64
and over 256 samples (``--memory-samples``); its peak resident set above the resident set
before it (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, Linux) is
reported: flat in N means O(batch). Run it with ``MALLOC_MMAP_THRESHOLD_=65536`` in the
environment, so that glibc returns freed tensors to the system and the resident set is what
is alive (without it, memory a previous batch freed is reused and shows as no growth).

    flock /tmp/pyxtask-heavy.lock nice -n 5 .venv/bin/python benchmarks/bench_sample_weights.py

Results: ``benchmarks/results/sample-weights-cost/`` (``results.json``, ``results.md``,
``ratios.png``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, vmap

from pyxtask.data import LabelMap, corpora
from pyxtask.data.tokenization import collate, tokenize_corpus
from pyxtask.models import MultiTaskModel
from pyxtask.sample_gradients import SampleGradientProducts

RESULTS = Path(__file__).resolve().parent / "results" / "sample-weights-cost"
CONTENDERS = ("plain", "update", "in_step", "opacus", "vmap")
TITLES = {
    "plain": "plain pass (forward + backward)",
    "update": "products: update pass (measure)",
    "in_step": "products: in the training step (capture)",
    "opacus": "Opacus 1.6 ghost clipping: norms only",
    "vmap": "vmap(grad) reference: per-sample gradients",
}


class Batch:
    """One padded batch with everything the encoder is given explicitly (contiguous
    position and token-type ids for Opacus; a 4-D additive mask, which BERT takes as is,
    for vmap)."""

    def __init__(self, items: dict[str, Tensor]) -> None:
        self.ids = items["input_ids"]
        self.mask = items["attention_mask"]
        self.labels = items["labels"]
        B, L = self.ids.shape
        self.positions = torch.arange(L).expand(B, L).contiguous()
        self.token_types = torch.zeros(B, L, dtype=torch.long)
        self.additive = (1.0 - self.mask[:, None, None, :].float()) * torch.finfo(torch.float32).min

    def inputs(self) -> dict[str, Tensor]:
        return {
            "input_ids": self.ids,
            "attention_mask": self.additive,
            "position_ids": self.positions,
            "token_type_ids": self.token_types,
        }


def per_sample_losses(encoder: Any, head: Any, inputs: dict[str, Tensor], labels: Tensor) -> Tensor:
    hidden = encoder(**inputs).last_hidden_state
    logits = head(hidden, (inputs["attention_mask"][:, 0, 0] == 0).long())
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return ce.view(labels.shape).sum(1)  # ignore_index positions give 0


def load(samples: int, batch: int) -> tuple[MultiTaskModel, list[Batch], dict[str, Tensor]]:
    torch.manual_seed(0)
    source = corpora.load("brown", "pos", "train", samples, 0)
    target = corpora.load("wsj-pos", "pos", "train", batch, 0)
    src_labels = LabelMap.from_corpus([s.tags for s in source], name="src", kind="token")
    tgt_labels = LabelMap.from_corpus([s.tags for s in target], name="tgt", kind="token")
    model = MultiTaskModel.from_pretrained(
        None, [("src", src_labels), ("tgt", tgt_labels)], dropout=0.0
    ).train()  # Opacus hooks only a module in training mode
    for module in model.modules():  # no dropout: every contender computes the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    assert model.tokenizer is not None
    pad = model.tokenizer.pad_token_id
    encoded, _ = tokenize_corpus(source, src_labels, model.tokenizer, warn=False)
    batches = [Batch(collate(encoded[i : i + batch], pad)) for i in range(0, len(encoded), batch)]
    tgt_encoded, _ = tokenize_corpus(target, tgt_labels, model.tokenizer, warn=False)
    tgt = Batch(collate(tgt_encoded, pad))
    loss = per_sample_losses(model.encoder, model.head("tgt"), tgt.inputs(), tgt.labels).mean()
    names = [n for n, _ in model.encoder.named_parameters()]
    grads = torch.autograd.grad(loss, list(model.encoder.parameters()))
    vector = {n: g.detach() for n, g in zip(names, grads, strict=True)}
    return model, batches, vector


def contenders(
    model: MultiTaskModel, vector: dict[str, Tensor]
) -> dict[str, Callable[[Batch], Any]]:
    encoder, head = model.encoder, model.head("src")
    products = SampleGradientProducts(encoder)

    def plain(b: Batch) -> None:
        per_sample_losses(encoder, head, b.inputs(), b.labels).sum().backward()
        model.zero_grad(set_to_none=True)

    def update(b: Batch) -> tuple[Tensor | None, Tensor]:
        return products.measure(
            lambda: per_sample_losses(encoder, head, b.inputs(), b.labels), vector, b.mask
        )

    def in_step(b: Batch) -> tuple[Tensor | None, Tensor]:
        with products.capture(vector, b.mask):
            per_sample_losses(encoder, head, b.inputs(), b.labels).sum().backward()
        model.zero_grad(set_to_none=True)
        return products.dots, products.sq_norms

    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    peer = copy.deepcopy(model)
    ghost = GradSampleModuleFastGradientClipping(
        peer.encoder, batch_first=True, loss_reduction="sum", strict=False
    )
    peer_head = peer.head("src")

    def opacus(b: Batch) -> Tensor:
        per_sample_losses(ghost, peer_head, b.inputs(), b.labels).sum().backward()
        norms = ghost.get_norm_sample()
        peer.zero_grad(set_to_none=True)
        return norms.square()

    params = {n: p.detach() for n, p in encoder.named_parameters()}

    def one(p: dict[str, Tensor], inputs: dict[str, Tensor], labels: Tensor) -> Tensor:
        single = {k: v[None] for k, v in inputs.items()}
        return per_sample_losses(
            lambda **kw: functional_call(encoder, p, (), kw), head, single, labels[None]
        ).sum()

    per_sample = vmap(grad(one), in_dims=(None, 0, 0), chunk_size=4)

    def reference(b: Batch) -> tuple[Tensor, Tensor]:
        g = per_sample(params, b.inputs(), b.labels)
        dots = sum((g[n] * vector[n]).flatten(1).sum(1) for n in g)
        sq = sum(g[n].flatten(1).square().sum(1) for n in g)
        return torch.as_tensor(dots), torch.as_tensor(sq)

    return {
        "plain": plain,
        "update": update,
        "in_step": in_step,
        "opacus": opacus,
        "vmap": reference,
    }


def timed(fn: Callable[[Batch], Any], b: Batch) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(b)
    return time.process_time() - cpu, time.perf_counter() - wall, out


def time_all(args: argparse.Namespace) -> dict[str, Any]:
    model, batches, vector = load(args.samples, args.batch)
    fns = contenders(model, vector)
    fns["plain"](batches[0])  # warm-up: allocator, MKL, lazy init
    fns["update"](batches[0])
    cpu: dict[str, list[float]] = {k: [] for k in CONTENDERS}
    wall: dict[str, list[float]] = {k: [] for k in CONTENDERS}
    order = [k for k in CONTENDERS if k != "vmap"]
    for r in range(args.rounds):
        c_round = dict.fromkeys(order, 0.0)
        w_round = dict.fromkeys(order, 0.0)
        for i, b in enumerate(batches):
            shift = (r + i) % len(order)
            for name in order[shift:] + order[:shift]:
                c, w, _ = timed(fns[name], b)
                c_round[name] += c
                w_round[name] += w
        for name in order:
            cpu[name].append(c_round[name])
            wall[name].append(w_round[name])
        print(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in c_round.items()),
            flush=True,
        )
    # The reference, its agreement with the products (float32) on the same batches.
    errors = []
    c_ref = w_ref = 0.0
    for b in batches[: args.vmap_batches]:
        c, w, (ref_dots, ref_sq) = timed(fns["vmap"], b)
        c_ref, w_ref = c_ref + c, w_ref + w
        dots, sq = fns["update"](b)
        _, _, ghost_sq = timed(fns["opacus"], b)
        errors.append(
            {
                "dots": float((dots - ref_dots).abs().max() / ref_dots.abs().max()),
                "sq_norms": float(((sq - ref_sq).abs() / ref_sq).max()),
                "opacus_sq_norms": float(
                    ((ghost_sq.double() - ref_sq.double()).abs() / ref_sq).max()
                ),
                "dot_scale": float(ref_dots.abs().median()),
                "norm_scale": float(ref_sq.sqrt().median()),
            }
        )
    scale = len(batches) / args.vmap_batches
    cpu["vmap"] = [c_ref * scale]
    wall["vmap"] = [w_ref * scale]
    tokens = sum(int(b.mask.sum()) for b in batches)
    positions = sum(b.mask.numel() for b in batches)
    products = SampleGradientProducts(model.encoder)
    return {
        "cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
        "wall_s": {k: statistics.median(v) for k, v in wall.items()},
        "cpu_rounds": cpu,
        "agreement_float32": errors,
        "samples": sum(b.ids.shape[0] for b in batches),
        "batches": len(batches),
        "batch": args.batch,
        "real_token_fraction": tokens / positions,
        "encoder_parameters": sum(p.numel() for p in model.encoder.parameters()),
        "coverage": products.coverage,
        "threads": torch.get_num_threads(),
        "vmap_batches_timed": args.vmap_batches,
    }


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_above_now(run: Callable[[], Any]) -> float:
    """MiB by which the resident set's peak during run() exceeds the resident set before it.

    Linux resets the peak (VmHWM) to the current size when 5 is written to clear_refs."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - before) / 1024


def memory_all(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Every contender over each N of --memory-samples (vmap: one batch), one process."""
    model, batches, vector = load(max(args.memory_samples), args.batch)
    fns = contenders(model, vector)
    fns["plain"](batches[0])  # warm-up: lazily allocated state is not a contender's peak
    fns["update"](batches[0])
    out: dict[str, dict[str, float]] = {}
    for name in CONTENDERS:
        out[name] = {}
        for n in args.memory_samples if name != "vmap" else [args.batch]:
            chosen = batches[: -(-n // args.batch)]

            def run(fn: Callable[[Batch], Any] = fns[name], chosen: list[Batch] = chosen) -> None:
                for b in chosen:
                    fn(b)

            out[name][str(n)] = peak_above_now(run)
            print(f"memory {name} N={n}: {out[name][str(n)]:.0f} MiB", flush=True)
    return out


def report(result: dict[str, Any], out: Path) -> None:
    cpu, wall, mem = result["cpu_s"], result["wall_s"], result["memory_extra_peak_mib"]
    n = result["samples"]
    sizes = " / ".join(next((list(v) for v in mem.values() if len(v) > 1), []))
    p_mib = result["encoder_parameters"] * 4 / 2**20
    lines = [
        f"N = {n} Brown sentences, batch {result['batch']} ({result['batches']} batches, "
        f"{result['real_token_fraction']:.0%} of padded positions real), MiniLM "
        f"({result['encoder_parameters'] / 1e6:.1f} M encoder parameters, coverage "
        f"{result['coverage']:.0%}), {result['threads']} thread, float32.",
        "",
        "| contender | CPU s over N | wall s | x plain pass (CPU) | peak extra memory, "
        f"N = {sizes} |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for k in CONTENDERS:
        m = " / ".join(f"{v:.0f} MiB" for v in mem.get(k, {}).values())
        if k == "vmap":
            m += f" (one batch; all N per-sample gradients would be {n * p_mib / 1024:.1f} GiB)"
        lines.append(
            f"| {TITLES[k]} | {cpu[k]:.1f} | {wall[k]:.1f} | {cpu[k] / cpu['plain']:.2f} | {m} |"
        )
    agreement = result["agreement_float32"][0]
    lines += [
        "",
        f"vmap timed on {result['vmap_batches_timed']} batch(es), scaled to N. Against it "
        f"(float32): products' dots off by {agreement['dots']:.1e} of the largest, squared "
        f"norms by {agreement['sq_norms']:.1e} (relative); Opacus's norms by "
        f"{agreement['opacus_sq_norms']:.1e}. Median |dot| {agreement['dot_scale']:.3g}, "
        f"median norm {agreement['norm_scale']:.3g}.",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in result["commands"]),
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    names = list(CONTENDERS)
    ratios = [cpu[k] / cpu["plain"] for k in names]
    bars = ax.barh([TITLES[k] for k in names], ratios, color=["0.6", "C0", "C0", "C1", "C3"])
    ax.bar_label(bars, labels=[f"{r:.2f}x" for r in ratios], padding=3)
    ax.axvline(1.3, color="k", ls="--", lw=0.8, label="1.3x target")
    ax.set_xlim(0, max(ratios) * 1.15)
    ax.set_xlabel(f"CPU time over N = {n} samples, in plain training passes")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Per-sample products for a sample-weight update (MiniLM, CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "ratios.png", dpi=120)
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256, help="N source sentences")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vmap-batches", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--memory-samples",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[64, 256],
        help="N for the peak-memory runs (comma-separated; default 64,256)",
    )
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="measure the peaks only and add them to the results.json already in --out",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memory_only:
        result = json.loads((args.out / "results.json").read_text(encoding="utf-8"))
    else:
        result = time_all(args)
    result["memory_extra_peak_mib"] = {} if args.skip_memory else memory_all(args)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_sample_weights.py " + " ".join(sys.argv[1:])
    result.setdefault("commands", []).append(command.strip())
    report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
