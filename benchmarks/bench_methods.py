"""Times each training method's optimizer step against the plain summed-loss step.

Run ``python benchmarks/bench_methods.py`` (full: a 4-layer, 256-wide BERT, T = 4 tagging
tasks, 16 x 64 tokens per task, medians of 7 steps after 2 warm-up steps: 14 minutes on 2
busy cores) or ``--quick`` (a 2-layer, 128-wide BERT, 8 x 32 tokens, 3 steps after 1: 5-40 s
of timing). ``--device cuda`` times on the GPU (synchronised around every step); ``--methods``
picks contenders by name; ``--threads 1`` keeps timings steady when other processes share the
cores. The table goes to stdout and everything, with machine information, to
``benchmarks/results/bench_methods-<timestamp>.json``. See ``benchmarks/README.md``.

Every contender owns an identically initialised model (same seed) and AdamW, and sees the same
batches (random ids and labels, fixed seed; every task labels the same inputs, which MGDA-UB
needs). A method's step is what the trainer does per optimizer step: ``method.step``, clipping
at 1.0, ``optimizer.step``, ``zero_grad``, the step counters, ``method.after_update``. The
baseline ``plain`` is the same step in plain PyTorch (forward each task's batch, one backward
of the summed losses, clip, AdamW); every ratio divides by its median. Contenders are timed
round-robin (one step each per round, the order rotated every round), so load that comes and
goes on the machine falls on all of them alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor

import pyxtask
from pyxtask import ops
from pyxtask.config import TrainConfig
from pyxtask.data import LabelMap, collate
from pyxtask.data.tokenization import Encoded
from pyxtask.evaluation import autocast
from pyxtask.methods import Method, Step, StepContext, make_method
from pyxtask.models import MultiTaskModel
from pyxtask.tasks import TaskData

RESULTS = Path(__file__).resolve().parent / "results"
NUM_TASKS = 4
LABELS_PER_TASK = (45, 17, 12, 25)  # PTB-, UPOS-, chunk- and NER-sized tag sets
CLIP = 1.0
LR = 5e-5
WEIGHT_DECAY = 0.01


@dataclass(frozen=True)
class Setting:
    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    batch: int
    seq: int
    warmup: int
    reps: int
    #: Training items per task: a step takes the first ``batch``; TAWT's probe up to 64.
    train_items: int


FULL = Setting(8000, 256, 4, 4, 1024, batch=16, seq=64, warmup=2, reps=7, train_items=64)
QUICK = Setting(2000, 128, 2, 2, 512, batch=8, seq=32, warmup=1, reps=3, train_items=16)

# name -> (what the design predicts, relative to plain)
DESIGN: dict[str, str] = {
    "plain": "1 (baseline)",
    "equal": "1.0 (same step)",
    "tawt-step": "~1.0 (streaming hooks)",
    "mgda": "a few % over (T x P buffer)",
    "mgda-ub": "< 1 (one encoder pass)",
    "metaweighting": "~2 (query pass)",
    "gradnorm": "~1.0 (streaming hooks)",
    "uncertainty": "1.0 (plain backward)",
    "naive-grad": "~1.5-2 (2nd backward)",
    "fixed": "> 1 (T optimizer steps)",
    "tawt": "> 1 (T optimizer steps)",
    "tawt-probe": "once per epoch",
}
ALL_STEP = ("equal", "tawt-step", "mgda", "mgda-ub", "metaweighting", "gradnorm", "uncertainty")
STREAM = ("fixed", "tawt")
CONTENDERS = ("plain", *ALL_STEP, "naive-grad", *STREAM, "tawt-probe")

# ---------------------------------------------------------------------------------------------
# Data and model


def make_tasks() -> list[TaskData]:
    tasks = []
    for t, n in enumerate(LABELS_PER_TASK):
        name = f"bench.tag{t}"
        labels = LabelMap([f"L{i}" for i in range(n)], name=name.replace(".", "__"))
        tasks.append(TaskData(name, "token", labels, train=[]))
    return tasks


def make_items(setting: Setting, count: int, gen: torch.Generator) -> list[list[Encoded]]:
    """``count`` items per task: the same random sub-word ids for every task, each task its
    own random labels ([CLS] and [SEP] positions unlabelled)."""
    n, ignore = setting.seq, LabelMap.ignore_index
    ids = torch.randint(5, setting.vocab, (count, n), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS], [SEP]
    word_ids = (None, *range(n - 2), None)
    label_mask = (False, *([True] * (n - 2)), False)
    items: list[list[Encoded]] = []
    for k in LABELS_PER_TASK:
        labels = torch.randint(0, k, (count, n), generator=gen)
        labels[:, 0] = labels[:, -1] = ignore
        items.append(
            [
                Encoded(
                    input_ids=tuple(ids[i].tolist()),
                    attention_mask=(1,) * n,
                    labels=tuple(labels[i].tolist()),
                    word_ids=word_ids,
                    label_mask=label_mask,
                )
                for i in range(count)
            ]
        )
    return items


def build_model(setting: Setting, tasks: list[TaskData], device: torch.device) -> MultiTaskModel:
    torch.manual_seed(0)  # every contender starts from the same weights
    config = transformers.BertConfig(
        vocab_size=setting.vocab,
        hidden_size=setting.hidden,
        num_hidden_layers=setting.layers,
        num_attention_heads=setting.heads,
        intermediate_size=setting.intermediate,
    )
    model = MultiTaskModel.from_config(config, [(t.head, t.labels) for t in tasks])
    return model.to(device).train()


def make_optimizer(model: MultiTaskModel, method: Method | None) -> torch.optim.Optimizer:
    """The trainer's AdamW: decay on matrices, none on biases/LayerNorm, the method's own
    parameters as their own group."""
    params = list(model.parameters())
    groups: list[dict[str, Any]] = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    own = [] if method is None else method.parameters()
    if own:
        groups.append({"params": own, "weight_decay": 0.0, "lr": method.lr})  # type: ignore[union-attr]
    return torch.optim.AdamW(groups, lr=LR)


@dataclass
class Bench:
    setting: Setting
    device: torch.device
    bf16: bool
    tasks: list[TaskData]
    encoded: list[list[Encoded]]
    heldout: list[list[Encoded]]

    @property
    def rows(self) -> list[int]:
        return list(range(self.setting.batch))

    def batches(self) -> list[dict[str, Tensor]]:
        """Each task's step batch, collated and moved as the methods do it (every step)."""
        out = []
        for items in self.encoded:
            batch = collate([items[i] for i in self.rows], 0)
            out.append({k: v.to(self.device) for k, v in batch.items()})
        return out


# ---------------------------------------------------------------------------------------------
# Contenders: each is set up once and gives a zero-argument step


@dataclass
class Contender:
    name: str
    kind: str  # "baseline", "all", "stream", "contrast", "probe"
    step: Callable[[], object] | None = None
    close: Callable[[], None] = lambda: None
    samples: list[float] = field(default_factory=list)
    error: str | None = None
    note: str = ""


def plain_contender(bench: Bench) -> Contender:
    model = build_model(bench.setting, bench.tasks, bench.device)
    optimizer = make_optimizer(model, None)
    heads = [t.head for t in bench.tasks]

    def step() -> None:
        with autocast(bench.device, bench.bf16):
            losses = [
                model(h, b["input_ids"], b["attention_mask"], b["labels"]).loss.float()
                for h, b in zip(heads, bench.batches(), strict=True)
            ]
        torch.stack(losses).sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Contender("plain", "baseline", step, note="sum of T losses, one backward")


def naive_contender(bench: Bench) -> Contender:
    """Per-task weights the usual way: autograd.grad per task, torch.cat, a Gram, the
    min-norm weights, then a second, weighted backward through the retained graphs."""
    model = build_model(bench.setting, bench.tasks, bench.device)
    optimizer = make_optimizer(model, None)
    heads = [t.head for t in bench.tasks]
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    T = len(heads)

    def step() -> None:
        with autocast(bench.device, bench.bf16):
            losses = [
                model(h, b["input_ids"], b["attention_mask"], b["labels"]).loss.float()
                for h, b in zip(heads, bench.batches(), strict=True)
            ]
        rows = []
        for loss in losses:
            grads = torch.autograd.grad(loss, shared, retain_graph=True, materialize_grads=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        G = torch.stack(rows).float()
        lam = ops.min_norm_point((G @ G.T).double().cpu())
        factors = (lam * T).tolist()
        torch.stack([f * loss for f, loss in zip(factors, losses, strict=True)]).sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Contender(
        "naive-grad", "contrast", step, note="autograd.grad x T + cat + gram + 2nd backward"
    )


def method_context(bench: Bench, model: MultiTaskModel, method: Method) -> StepContext:
    ctx = StepContext(
        model,
        bench.tasks,
        bench.encoded,
        device=bench.device,
        bf16=bench.bf16,
        seed=0,
        batch_size=bench.setting.batch,
        heldout=bench.heldout if method.holdout > 0 else None,
    )
    ctx.steps_per_epoch = bench.setting.train_items // bench.setting.batch
    return ctx


def method_contender(bench: Bench, name: str) -> Contender:
    method = make_method(TrainConfig(method=name), 1.0)
    model = build_model(bench.setting, bench.tasks, bench.device)
    ctx = method_context(bench, model, method)
    method.bind(ctx)
    optimizer = make_optimizer(model, method)
    T, rows = len(bench.tasks), bench.rows
    counter = [0]

    def micro() -> list[Step]:
        if method.sampling == "all":
            return [[(t, rows) for t in range(T)]]
        if method.sampling == "shared":
            return [[(0, rows)]]  # rows of ctx.aligned(): every task labels these inputs
        counter[0] += 1
        return [[((counter[0] - 1) % T, rows)]]  # the stream: one task's batch, tasks in turn

    def step() -> None:
        method.step(ctx, micro())
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ctx.phase_step += 1
        ctx.global_step += 1
        method.after_update(ctx)

    kind = "stream" if method.sampling == "one" else "all"
    note = {
        "equal": "the plain step through the method API",
        "tawt-step": "streaming dot products in hooks",
        "mgda": "T x P buffer, gram, min_norm_point, scatter",
        "mgda-ub": "one encoder pass; grads w.r.t. the representation",
        "metaweighting": "support buffer + query pass after the step",
        "gradnorm": "streaming norms in hooks",
        "uncertainty": "plain backward of the learnable objective",
        "fixed": "one task's batch per step; x plain = T x step / plain",
        "tawt": "one task's batch per step (probes per epoch: tawt-probe)",
    }.get(name, "")
    return Contender(name, kind, step, close=method.close, note=note)


def probe_contender(bench: Bench) -> Contender:
    """TAWT's probe update (once per epoch in the paper's protocol): a ``probe_size`` batch
    per task in eval mode, their gradients in streaming mode, one mirror-descent step."""
    method = make_method(TrainConfig(method="tawt"), 1.0)
    model = build_model(bench.setting, bench.tasks, bench.device)
    ctx = method_context(bench, model, method)
    method.bind(ctx)
    update = getattr(method, "update")  # noqa: B009 (TAWTMethod.update)
    probe = min(TrainConfig().tawt.probe_size, bench.setting.train_items)
    return Contender(
        "tawt-probe",
        "probe",
        lambda: update(ctx),
        close=method.close,
        note=f"one update: {probe}-item probe per task (per epoch, not per step)",
    )


def build_contender(bench: Bench, name: str) -> Contender:
    try:
        if name == "plain":
            return plain_contender(bench)
        if name == "naive-grad":
            return naive_contender(bench)
        if name == "tawt-probe":
            return probe_contender(bench)
        return method_contender(bench, name)
    except Exception as exc:
        kind = "stream" if name in STREAM else "all"
        return Contender(name, kind, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])


# ---------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_rounds(contenders: list[Contender], device: torch.device, warmup: int, reps: int) -> None:
    """Round-robin: every live contender takes one step per round, the order rotated each
    round; the first ``warmup`` rounds are not kept."""
    for r in range(warmup + reps):
        live = [c for c in contenders if c.error is None and c.step is not None]
        k = r % max(1, len(live))
        for c in live[k:] + live[:k]:
            assert c.step is not None
            try:
                sync(device)
                start = time.perf_counter()
                c.step()
                sync(device)
                elapsed = time.perf_counter() - start
            except Exception as exc:
                c.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                continue
            if r >= warmup:
                c.samples.append(elapsed)
        print(f"  round {r + 1}/{warmup + reps}{' (warm-up)' * (r < warmup)}", file=sys.stderr)


def summarize(c: Contender, plain: Contender, num_tasks: int) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": c.name,
        "kind": c.kind,
        "design": DESIGN.get(c.name, ""),
        "note": c.note,
        "samples_s": c.samples,
        "error": c.error,
    }
    if not c.samples:
        return row
    row.update(median_s=statistics.median(c.samples), min_s=min(c.samples), max_s=max(c.samples))
    if not plain.samples:
        return row
    # Stream methods take one task's batch per step: T of their steps see what one plain
    # step sees, so their ratio is per T task batches.
    scale = num_tasks if c.kind == "stream" else 1
    row["ratio"] = scale * row["median_s"] / statistics.median(plain.samples)
    paired = [scale * a / b for a, b in zip(c.samples, plain.samples, strict=False)]
    row["paired_ratio"] = statistics.median(paired) if paired else None
    # Load on the cores only ever adds time: the fastest steps are the least disturbed.
    row["min_ratio"] = scale * row["min_s"] / min(plain.samples)
    return row


# ---------------------------------------------------------------------------------------------
# Reporting


def fmt_ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.1f}"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ["method", "ms/step", "min-max ms", "x plain", "paired", "min/min", "design", "what"]
    numeric = range(1, 6)
    cells = [head]
    for r in rows:
        if r.get("median_s") is None:
            cells.append([r["name"], "n/a", "-", "-", "-", "-", r["design"], r["error"] or ""])
            continue
        cells.append(
            [
                r["name"],
                fmt_ms(r["median_s"]),
                f"{fmt_ms(r['min_s'])}-{fmt_ms(r['max_s'])}",
                *(fmt_ratio(r.get(k)) for k in ("ratio", "paired_ratio", "min_ratio")),
                r["design"],
                r["note"],
            ]
        )
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    for i, row in enumerate(cells):
        text = [
            c.rjust(w) if j in numeric else c.ljust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(text).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "pyxtask": pyxtask.__version__,
        "build_info": pyxtask.build_info(),
        "cpu_model": cpu,
        "torch_num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min_at_end": os.getloadavg()[0],
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, 3 reps (< 60 s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU only)")
    parser.add_argument(
        "--methods",
        default=",".join(CONTENDERS),
        help="comma list of contenders (plain is always run)",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed steps per contender")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's own; 1 is steadier on a loaded machine)",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON results path")
    args = parser.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; choose from {', '.join(CONTENDERS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    setting = QUICK if args.quick else FULL
    reps = setting.reps if args.reps is None else args.reps
    gen = torch.Generator().manual_seed(0)
    bench = Bench(
        setting,
        device,
        args.bf16,
        make_tasks(),
        make_items(setting, setting.train_items, gen),
        make_items(setting, setting.batch, gen),
    )
    wanted = set(args.methods.split(",")) | {"plain"}
    start = time.perf_counter()
    contenders = [build_contender(bench, name) for name in CONTENDERS if name in wanted]
    probe_model = build_model(setting, bench.tasks, torch.device("cpu"))
    n_params = sum(p.numel() for p in probe_model.parameters())
    n_shared = sum(p.numel() for p in probe_model.shared_parameters())
    del probe_model
    print(
        f"bench_methods: BERT {setting.layers}x{setting.hidden} (vocab {setting.vocab}), "
        f"T={NUM_TASKS} token tasks, {setting.batch}x{setting.seq} tokens per task, "
        f"P={n_shared:,} shared / {n_params:,} params, {device}"
        f"{' bf16' * args.bf16}, {torch.get_num_threads()} threads, "
        f"{setting.warmup} warm-up + {reps} timed rounds",
        file=sys.stderr,
    )
    run_rounds(contenders, device, setting.warmup, reps)
    for c in contenders:
        c.close()
    elapsed = time.perf_counter() - start

    plain = contenders[0]
    rows = [summarize(c, plain, NUM_TASKS) for c in contenders]
    print(
        f"\n== Optimizer step per method vs the plain summed-loss step ({device}, "
        f"median of {reps}; x plain = median / plain median, paired = median of per-round "
        "ratios, min/min = fastest / plain's fastest; stream rows: T x step / plain)"
    )
    print_table(rows)
    equal = next((r for r in rows if r["name"] == "equal"), None)
    if equal is not None and equal.get("ratio") is not None:
        ok = 0.9 <= equal["ratio"] <= 1.1
        print(
            f"\nsanity: equal / plain = {equal['ratio']:.2f}x "
            f"({'OK' if ok else 'CHECK'}: the same step, expected ~1.0)"
        )
    load = os.getloadavg()[0]
    print(f"{len(contenders)} contenders in {elapsed:.0f} s; load average (1 min) {load:.2f}")

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"bench_methods-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine_info(device),
        "args": {
            "quick": args.quick,
            "device": args.device,
            "bf16": args.bf16,
            "methods": args.methods,
            "reps": reps,
            "threads": args.threads,
        },
        "setting": {
            **setting.__dict__,
            "reps": reps,
            "num_tasks": NUM_TASKS,
            "labels_per_task": LABELS_PER_TASK,
            "shared_parameters": n_shared,
            "parameters": n_params,
        },
        "elapsed_s": elapsed,
        "results": rows,
    }
    out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
