"""Export a trained run's target model as a servable bundle (ONNX, TorchScript, tokenizer).

``export_run(RUN_DIR, BUNDLE)`` takes the run's best model (``RUN_DIR/best``), keeps the
encoder and the *target* head only, and writes:

- ``model.onnx``: fp32, dynamic batch and sequence axes, checked with ``onnx.checker``, then
  rewritten by onnxruntime's transformer optimizer (fused attention, LayerNorm, GELU) where it
  recognises the encoder; ``model.fp16.onnx`` (fp16 weights, fp32 inputs/outputs) and
  ``model.int8.onnx`` (onnxruntime's dynamic int8 quantization) on request;
- ``model.ts``: the same module traced to TorchScript;
- ``tokenizer/`` (the fast tokenizer's files), ``labels.json`` (the target's label map) and
  ``manifest.json``: versions, opset, inputs and outputs, window settings, task kind, the
  SHA-256 of every file, and for every ONNX variant its target test metric as measured by the
  bundle's own :class:`~pyxtask.serving.Tagger` (so a quantized model's accuracy change is
  reported, not assumed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from pyxtask import checkpoint
from pyxtask._hashing import sha256_file
from pyxtask.models import MultiTaskModel
from pyxtask.serving.bundle import BUNDLE_FORMAT, BUNDLE_VERSION, MANIFEST

__all__ = ["DEFAULT_OPSET", "OPSETS", "ExportError", "TargetModel", "export_run"]

DEFAULT_OPSET = 17
#: The opsets an export succeeds with (measured with torch 2.13 and onnxruntime 1.32, every
#: variant): 7-9 cannot express the encoder's slices over the dynamic sequence axis, and torch's
#: TorchScript-based exporter supports none above 20.
OPSETS = range(10, 21)
_STRIDE_DEFAULT = 32


class ExportError(RuntimeError):
    """The run cannot be exported (no best model, an unknown target head, a failed check)."""


class TargetModel(nn.Module):
    """Encoder plus one head: ``(input_ids, attention_mask) -> logits``, nothing else."""

    def __init__(self, model: MultiTaskModel, task: str) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.head = model.head(task)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return cast(Tensor, self.head(hidden, attention_mask))


def _load_run(run_dir: Path) -> tuple[MultiTaskModel, dict[str, Any]]:
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise ExportError(
            f"{os.fspath(run_dir)!r} holds no finished run (no summary.json); train it first "
            "(pyxtask train) or resume it (pyxtask train --resume)"
        )
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    # The run's own folder first: a copied or moved run must not export the original's model.
    best = run_dir / "best"
    if not best.is_dir():
        best = Path(summary.get("best_model", best))
    model = MultiTaskModel.load(best)
    head = summary.get("target_head")
    if head not in model.task_names:
        raise ExportError(f"the run's target head {head!r} is not in {best}: {model.task_names}")
    if model.tokenizer is None or not getattr(model.tokenizer, "is_fast", False):
        raise ExportError("the run's model has no fast tokenizer to ship with the bundle")
    return model, summary


def _example_inputs(model: MultiTaskModel) -> tuple[Tensor, Tensor]:
    tokenizer = model.tokenizer
    batch = tokenizer(
        [["an", "example", "sentence"], ["a", "second", "longer", "example", "sentence", "."]],
        is_split_into_words=True,
        padding=True,
        return_tensors="pt",
    )
    return batch["input_ids"], batch["attention_mask"]


def _export_onnx(
    module: TargetModel, inputs: tuple[Tensor, Tensor], path: Path, opset: int
) -> None:
    import onnx  # noqa: PLC0415

    logits_axes = {0: "batch", 1: "sequence"} if module.head.kind == "token" else {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notes
        torch.onnx.export(
            module,
            inputs,
            os.fspath(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "logits": logits_axes,
            },
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    onnx.checker.check_model(os.fspath(path), full_check=True)


def _optimize(path: Path, config: Any) -> bool:
    """onnxruntime's BERT fusions in place; False (and the plain graph kept) if they fail."""
    from onnxruntime.transformers.optimizer import optimize_model  # noqa: PLC0415

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimized = optimize_model(
                os.fspath(path),
                model_type="bert",
                num_heads=int(config.num_attention_heads),
                hidden_size=int(config.hidden_size),
            )
        optimized.save_model_to_file(os.fspath(path))
    except Exception as exc:
        warnings.warn(
            f"onnxruntime's transformer optimizer failed ({exc}); kept the plain graph",
            stacklevel=3,
        )
        return False
    return True


def _fp16(src: Path, dst: Path) -> None:
    import onnx  # noqa: PLC0415
    from onnxruntime.transformers.float16 import convert_float_to_float16  # noqa: PLC0415

    model = onnx.load(os.fspath(src))
    onnx.save(convert_float_to_float16(model, keep_io_types=True), os.fspath(dst))


def _int8(src: Path, dst: Path) -> None:
    import logging  # noqa: PLC0415

    import onnx  # noqa: PLC0415
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415

    # The quantizer logs a "consider pre-processing" warning through the root logger on every
    # call; quieten it for this call only.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        # The fused ops (com.microsoft Attention, …) defeat ONNX shape inference; their
        # outputs are float, which is what the quantizer needs to be told.
        quantize_dynamic(
            os.fspath(src),
            os.fspath(dst),
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.setLevel(level)


def _test_metric(
    bundle: Path, variant: str, summary: dict[str, Any], run_dir: Path
) -> float | None:
    """The target's test metric with this variant, measured through the serving path."""
    from pyxtask.config import ConfigError, TrainConfig  # noqa: PLC0415
    from pyxtask.data.corpora import CorpusError  # noqa: PLC0415
    from pyxtask.evaluation import metric_name  # noqa: PLC0415
    from pyxtask.metrics import sentence_scores, span_f1, token_accuracy  # noqa: PLC0415
    from pyxtask.serving.tagger import Tagger  # noqa: PLC0415
    from pyxtask.tasks import TaskData, load_tasks  # noqa: PLC0415

    config_path = run_dir / "config.json"
    if not config_path.is_file():
        return None
    raw = json.loads(config_path.read_text(encoding="utf-8"))
    raw["tawt"] = {k: v for k, v in raw.get("tawt", {}).items()}
    from pyxtask.config import from_mapping  # noqa: PLC0415

    config: TrainConfig = from_mapping(raw, source=os.fspath(config_path)).replace(
        paradigm="single", method="fixed", compare=[], total_steps=None
    )
    try:
        target: TaskData = load_tasks(config)[0]
    except (ConfigError, CorpusError):  # not a named corpus (tasks given in Python)
        return None
    tagger = Tagger(bundle, variant, verify=False)
    if target.kind == "sentence":
        texts = [e.text for e in target.test]  # type: ignore[union-attr]
        pred = [cast(str, r.label) for r in tagger.tag(texts)]
        gold = [e.label for e in target.test]  # type: ignore[union-attr]
        return float(sentence_scores(gold, pred, labels=list(target.labels)).accuracy)
    words = [list(e.words) for e in target.test]  # type: ignore[union-attr]
    gold_tags = [list(e.tags) for e in target.test]  # type: ignore[union-attr]
    pred_tags = [[lab or "O" for lab in r.labels] for r in tagger.tag(words)]
    if metric_name(target) == "f1":
        return float(span_f1(gold_tags, pred_tags).f1)
    return float(token_accuracy(gold_tags, pred_tags))


def export_run(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    int8: bool = False,
    optimize: bool = True,
    torchscript: bool = True,
    measure: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write the bundle of ``run_dir``'s target model into ``out``; return its manifest.

    The bundle is built in a temporary folder beside ``out`` and renamed into place, so an
    interrupted export never leaves a half bundle. ``measure`` evaluates every ONNX variant on
    the target's test split through :class:`~pyxtask.serving.Tagger`. ``opset`` is one of
    :data:`OPSETS` (10-20), else an :class:`ExportError`.
    """
    import onnx  # noqa: PLC0415
    import onnxruntime  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    import pyxtask  # noqa: PLC0415

    say = log or (lambda _: None)
    run = Path(run_dir)
    target = Path(out)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{os.fspath(target)!r} exists; pass overwrite=True (--overwrite)")
    if opset not in OPSETS:
        raise ExportError(
            f"--opset {opset}: supported opsets are {OPSETS[0]}-{OPSETS[-1]} (default "
            f"{DEFAULT_OPSET})"
        )
    model, summary = _load_run(run)
    head = summary["target_head"]
    config = (
        json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    )
    max_length = int(config.get("max_length", 128))
    stride = min(_STRIDE_DEFAULT, (max_length - 2) // 4)
    model.encoder.set_attn_implementation("eager")  # the attention pattern ORT's fusions know
    module = TargetModel(model, head).eval()
    inputs = _example_inputs(model)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        started = time.perf_counter()
        say(f"exporting {head} to ONNX (opset {opset})")
        _export_onnx(module, inputs, tmp / "model.onnx", opset)
        fused = _optimize(tmp / "model.onnx", model.encoder.config) if optimize else False
        variants: dict[str, dict[str, Any]] = {"fp32": {"file": "model.onnx", "optimized": fused}}
        if fp16:
            say("fp16 weights")
            _fp16(tmp / "model.onnx", tmp / "model.fp16.onnx")
            variants["fp16"] = {"file": "model.fp16.onnx", "optimized": fused}
        if int8:
            say("dynamic int8 quantization")
            _int8(tmp / "model.onnx", tmp / "model.int8.onnx")
            variants["int8"] = {"file": "model.int8.onnx", "optimized": fused}
        if torchscript:
            say("TorchScript")
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = cast(Any, torch.jit).trace(module, inputs, check_trace=False)
            torch.jit.save(traced, os.fspath(tmp / "model.ts"))
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        label_map = model.head(head).label_map
        label_map.save(tmp / "labels.json")
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "task": summary.get("target", head),
            "head": head,
            "kind": label_map.kind,
            "labels": list(label_map.labels),
            "metric": summary.get("metric"),
            "max_length": max_length,
            "stride": stride,
            "label_all": "first",
            "pad_token_id": int(model.tokenizer.pad_token_id),
            "tokenizer": "tokenizer/tokenizer.json",
            "inputs": {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]},
            "outputs": {
                "logits": ["batch", "sequence", "labels"]
                if label_map.kind == "token"
                else ["batch", "labels"]
            },
            "opset": opset,
            "variants": variants,
            "torchscript": "model.ts" if torchscript else None,
            "source_run": os.fspath(run.resolve()),
            "trained_test_metric": summary.get("test"),
            "versions": {
                "pyxtask": pyxtask.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": {name: sha256_file(tmp / name) for name in files},
        }
        if not (tmp / manifest["tokenizer"]).is_file():
            raise ExportError("the tokenizer saved no tokenizer.json (not a fast tokenizer?)")
        checkpoint.write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        if measure:
            for name, variant in variants.items():
                say(f"measuring {name} on the target's test split")
                variant["test_metric"] = _test_metric(tmp, name, summary, run)
            checkpoint.write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        manifest["export_seconds"] = round(time.perf_counter() - started, 1)
        checkpoint.write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
