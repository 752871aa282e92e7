"""The peers' steps on the same work: TorchJD 0.18 and LibMTL 1.1.5, where installed.

Each peer row owns its own copy of the model (TorchJD's autogram engine hooks every module it
is given; those hooks must not touch the other contenders) and sees the same batches, one
encoder pass per task, like pyxtask's all-tasks methods.

- ``torchjd:<w>/autojac``: ``mtl_backward`` (the Jacobian of the T losses with respect to the
  shared parameters, in ``.jac``) then ``jac_to_grad`` with the aggregator of weighting ``w``.
- ``torchjd:<w>/autogram``: the ``autogram.Engine`` computes the T x T Gramian without the
  Jacobian, the weighting maps it to weights, and one backward of the weighted losses follows.
- ``libmtl:<w>``: LibMTL's weighting driven outside its trainer: a small host supplies what its
  ``AbsWeighting`` expects (the shared parameters, the number of tasks, the device); its
  ``backward`` takes the per-task gradients (one backward per task) and writes ``.grad``.

Peers are installed with ``pip install --no-deps -r requirements/peers.txt`` (their declared
dependencies would replace torch); a missing peer is a row with the reason, not a failure.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from pyxtask.evaluation import autocast
from pyxtask.models import MultiTaskModel

from .contenders import Contender, task_losses
from .workload import Workload, build_model, finish_step, make_optimizer

__all__ = [
    "LIBMTL",
    "TORCHJD",
    "libmtl_contender",
    "load_libmtl",
    "peer_names",
    "torchjd_contender",
]

#: pyxtask method name -> TorchJD aggregator class and keyword arguments (the same weighting).
TORCHJD: dict[str, tuple[str, dict[str, Any]]] = {
    "mgda": ("MGDA", {}),
    "upgrad": ("UPGrad", {}),
    "dualproj": ("DualProj", {}),
    "pcgrad": ("PCGrad", {}),
    "cagrad": ("CAGrad", {"c": 0.4}),
    "imtl-g": ("IMTLG", {}),
    "aligned-mtl": ("AlignedMTL", {}),
    "nash-mtl": ("NashMTL", {}),  # not Gramian-based: autojac only
}
#: pyxtask method name -> LibMTL weighting module and the keyword arguments of its backward.
LIBMTL: dict[str, tuple[str, dict[str, Any]]] = {
    "mgda": ("MGDA", {"mgda_gn": "none"}),
    "pcgrad": ("PCGrad", {}),
    "cagrad": ("CAGrad", {"calpha": 0.4, "rescale": 1}),
    "imtl-g": ("IMTL", {}),
    "dwa": ("DWA", {"T": 2.0}),
    "rlw": ("RLW", {"dist": "Normal"}),
}


def peer_names() -> list[str]:
    """Every peer row `pyxtask bench` can run."""
    rows = [f"torchjd:{w}/autojac" for w in TORCHJD]
    rows += [f"torchjd:{w}/autogram" for w in TORCHJD if w != "nash-mtl"]
    return rows + [f"libmtl:{w}" for w in LIBMTL]


def torchjd_contender(work: Workload, weighting: str, variant: str) -> Contender:
    name = f"torchjd:{weighting}/{variant}"
    try:
        aggregation = importlib.import_module("torchjd.aggregation")
        autojac = importlib.import_module("torchjd.autojac")
    except ImportError as exc:
        return Contender(name, "peer", error=f"torchjd not installed ({exc})")
    cls_name, kwargs = TORCHJD[weighting]
    model = build_model(work)
    optimizer = make_optimizer(model)
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    heads = [list(model.task_parameters(t.head)) for t in work.tasks]
    if variant == "autogram":
        engine = importlib.import_module("torchjd.autogram").Engine(model.encoder, batch_dim=None)
        gramian_weighting = getattr(aggregation, cls_name + "Weighting")(**kwargs)

        def step() -> None:
            losses = torch.stack(task_losses(model, work))
            weights = gramian_weighting(engine.compute_gramian(losses))
            torch.autograd.backward(losses, weights)
            finish_step(model, optimizer)

        note = "autogram Engine (Gramian without the Jacobian) + one weighted backward"
    else:
        extra = {"n_tasks": work.num_tasks} if cls_name == "NashMTL" else {}
        aggregator = getattr(aggregation, cls_name)(**kwargs, **extra)

        def step() -> None:
            features, losses = _features_and_losses(model, work)
            autojac.mtl_backward(
                losses, features=features, tasks_params=heads, shared_params=shared
            )
            autojac.jac_to_grad(shared, aggregator)
            finish_step(model, optimizer)

        note = "mtl_backward (Jacobian in .jac) + jac_to_grad"
    return Contender(name, "peer", step, note=note, compare_with=weighting)


def _features_and_losses(
    model: MultiTaskModel, work: Workload
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each task's encoder output (mtl_backward's ``features``) and its loss."""
    features, losses = [], []
    with autocast(work.device, work.bf16):
        for t, b in zip(work.tasks, work.batches(), strict=True):
            hidden = model.encode(b["input_ids"], b["attention_mask"])
            out = model.apply_head(t.head, hidden, b["attention_mask"], b["labels"])
            features.append(hidden)
            losses.append(torch.as_tensor(out.loss).float())
    return features, losses


def load_libmtl(module: str) -> ModuleType:
    """A LibMTL weighting module, loaded without ``import LibMTL`` (whose ``__init__`` imports
    torchvision APIs that no longer exist)."""
    spec = importlib.util.find_spec("LibMTL")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("LibMTL not installed")
    root = Path(next(iter(spec.submodule_search_locations))) / "weighting"
    loaded = None
    for name in ("abstract_weighting", module):
        dotted = f"LibMTL.weighting.{name}"
        if dotted in sys.modules:
            loaded = sys.modules[dotted]
            continue
        file_spec = importlib.util.spec_from_file_location(dotted, root / f"{name}.py")
        assert file_spec is not None and file_spec.loader is not None
        loaded = importlib.util.module_from_spec(file_spec)
        sys.modules[dotted] = loaded
        file_spec.loader.exec_module(loaded)
    assert loaded is not None
    return loaded


def libmtl_contender(work: Workload, weighting: str) -> Contender:
    name = f"libmtl:{weighting}"
    module, kwargs = LIBMTL[weighting]
    try:
        cls = getattr(load_libmtl(module), module)
    except Exception as exc:
        return Contender(name, "peer", error=f"LibMTL's {module}.py does not load: {exc}")
    model = build_model(work)
    host = _libmtl_host(cls, model, work)
    optimizer = make_optimizer(model)
    if list(host.parameters(recurse=False)):  # IMTL's loss scales train with the model
        optimizer.add_param_group({"params": list(host.parameters(recurse=False))})

    def step() -> None:
        losses = torch.stack(task_losses(model, work))
        host.backward(losses, **kwargs)
        finish_step(model, optimizer)

    return Contender(
        name, "peer", step, note="its backward(): one backward per task", compare_with=weighting
    )


def _libmtl_host(cls: type, model: nn.Module, work: Workload) -> Any:
    """An instance of LibMTL's weighting ``cls`` with the attributes its trainer would set."""
    encoder: nn.Module = getattr(model, "encoder")  # noqa: B009

    class Host(cls):  # type: ignore[misc]
        def get_share_params(self) -> Any:
            return encoder.parameters()

        def zero_grad_share_params(self) -> None:
            encoder.zero_grad(set_to_none=False)

    host = Host()
    host.task_num, host.device, host.rep_grad = work.num_tasks, work.device, False
    host.epoch, host.train_loss_buffer = 0, None  # DWA: weights 1 until two epochs are seen
    host.init_param()
    return host
