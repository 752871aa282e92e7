"""The tasks of a run: the target (with dev and test) and the sources, and the model for them.

A task is named ``corpus.task`` (``pyxtask data list``); :func:`load_tasks` reads the named
corpora, :func:`build_model` builds the shared encoder with one head per task.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from pyxtask import checkpoint, window_mlp
from pyxtask.config import ConfigError, TrainConfig
from pyxtask.data import CorpusFormatError, LabeledText, LabelMap, TaggedSentence, corpora, files
from pyxtask.data.words import labelled_tags, word_examples
from pyxtask.models import MultiTaskModel

__all__ = ["Example", "TaskData", "build_model", "load_tasks"]

Example = TaggedSentence | LabeledText


@dataclass
class TaskData:
    """One task's examples: ``name`` is ``corpus.task``; only the target needs dev and test."""

    name: str
    kind: str
    labels: LabelMap
    train: list[Example]
    dev: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    @property
    def head(self) -> str:
        """The model's head name (heads cannot contain dots)."""
        return self.name.replace(".", "__")


def _labels_of(examples: Sequence[Example]) -> list[str | tuple[str, ...]]:
    return [labelled_tags(e) if isinstance(e, TaggedSentence) else e.label for e in examples]


def load_tasks(config: TrainConfig) -> list[TaskData]:
    """The target (with dev and test) and the sources, from named corpora or the user's files."""
    tasks: list[TaskData] = []
    names = [config.target] + ([] if config.paradigm == "single" else config.sources)
    for i, name in enumerate(names):
        if name in config.tasks:
            tasks.append(_file_task(config, name, target=i == 0))
            continue
        corpus_name, task = name.split(".")
        try:
            corpus = corpora.get_corpus(corpus_name)
        except corpora.CorpusError as exc:
            raise ConfigError(f"task {name!r}: {exc}") from None
        if task not in corpus.tasks:
            raise ConfigError(
                f"task {name!r}: corpus {corpus_name!r} has no task {task!r}; its tasks: "
                f"{', '.join(corpus.tasks)}"
            )
        size = config.target_size if i == 0 else config.source_size
        words = config.examples == "words"
        train: list[Example] = list(
            corpora.load(
                corpus_name, task, "train", None if words else size, config.seed,
                cache=config.cache,
            )
        )  # fmt: skip
        if words:
            train = _word_examples(config, name, corpus.tasks[task], train, size)
        dev: list[Example] = []
        test: list[Example] = []
        if i == 0:
            dev = list(
                corpora.load(corpus_name, task, "dev", config.dev_size, 0, cache=config.cache)
            )
            test = list(
                corpora.load(corpus_name, task, "test", config.test_size, 0, cache=config.cache)
            )
        if size is not None and len(train) < size:
            raise ConfigError(
                f"{'target_size' if i == 0 else 'source_size'} = {size} but {name!r} has only "
                f"{len(train)} training {config.examples}"
            )
        kind = corpus.tasks[task]
        labels = LabelMap.from_corpus(
            _labels_of(train + dev + test), name=name.replace(".", "__"), kind=kind
        )
        tasks.append(TaskData(name, kind, labels, train, dev, test))
    return tasks


def _file_task(config: TrainConfig, name: str, *, target: bool) -> TaskData:
    spec = config.tasks[name]
    try:
        splits = files.check_labels(name, files.read_splits(spec, name), config.unseen_labels)
    except (files.FileTaskError, CorpusFormatError) as exc:
        raise ConfigError(f"task {name!r}: {exc}") from None
    size = config.target_size if target else config.source_size
    if config.examples == "words":
        train = _word_examples(config, name, files.kind_of(spec), splits["train"], size)
    else:
        train = _sample(splits["train"], size, config.seed)
    if size is not None and len(train) < size:
        raise ConfigError(
            f"{'target_size' if target else 'source_size'} = {size} but {name!r} has only "
            f'{len(train)} training examples ({spec.train}); set it lower, or to "all"'
        )
    dev = _sample(splits["dev"], config.dev_size, 0) if target else []
    test = _sample(splits["test"], config.test_size, 0) if target else []
    if target and (not dev or not test):
        raise ConfigError(
            f"task {name!r}: the target needs dev and test examples; {spec.train} gives "
            f"{len(dev)} and {len(test)} (add dev/test files, or raise the split fractions)"
        )
    kind = files.kind_of(spec)
    # The full training split decides the labels: a small sample must not drop any.
    seen = _labels_of(splits["train"]) + _labels_of(dev + test)
    labels = LabelMap.from_corpus(seen, name=name.replace(".", "__"), kind=kind)  # type: ignore[arg-type]
    return TaskData(name, kind, labels, train, dev, test)


def _word_examples(
    config: TrainConfig, name: str, kind: str, sentences: Sequence[Example], size: int | None
) -> list[Example]:
    """``examples = "words"``: ``size`` seeded words of the task's training sentences, each
    with only its window's words around it for ``window-mlp`` (the same feature, less work)."""
    if kind != "token":
        raise ConfigError(f"examples = 'words' is for token tasks; {name!r} labels whole texts")
    context = config.window_mlp.window if config.encoder == "window-mlp" else None
    tagged = cast(list[TaggedSentence], list(sentences))
    return list(word_examples(tagged, size, config.seed, context))


def _sample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """A seeded sample of ``limit`` examples in file order (all of them without a limit)."""
    return [examples[i] for i in corpora.sample_indices(len(examples), limit, seed)]


def _tiny_vocabulary(tasks: Sequence[TaskData], size: int = 4000) -> list[str]:
    """A WordPiece vocabulary: specials, every character (also as ``##c``), frequent words.

    Built by counting, not with ``tokenizers``' WordPiece trainer, whose result changes from
    run to run (hash-map order decides its ties), which would make runs irreproducible.
    """
    from tokenizers import normalizers, pre_tokenizers  # noqa: PLC0415

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for task in tasks:
        for e in task.train:
            text = " ".join(e.words) if isinstance(e, TaggedSentence) else e.text
            counts.update(w for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    taken = set(vocab)
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= size:
            break
        if word not in taken:
            vocab.append(word)
            taken.add(word)
    return vocab


def _tiny_encoder(tasks: Sequence[TaskData], config: TrainConfig, folder: Path) -> MultiTaskModel:
    """A small random BERT with a word-and-character vocabulary from the training text."""
    import transformers  # noqa: PLC0415

    vocab_file = folder / "vocab.txt"
    if not vocab_file.exists():  # a resumed run keeps the vocabulary it started with
        folder.mkdir(parents=True, exist_ok=True)
        text = "".join(f"{token}\n" for token in _tiny_vocabulary(tasks))
        checkpoint.write_text(vocab_file, text)
    tokenizer = cast(Any, transformers).BertTokenizerFast.from_pretrained(
        folder, local_files_only=True
    )
    bert = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=max(config.max_length, 64),
    )
    heads = [(t.head, t.labels) for t in tasks]
    return MultiTaskModel.from_config(bert, heads, tokenizer=tokenizer, dropout=config.dropout)


def build_model(tasks: Sequence[TaskData], config: TrainConfig, run_dir: Path) -> MultiTaskModel:
    torch.manual_seed(config.seed)
    heads = [(t.head, t.labels) for t in tasks]
    if config.encoder == "tiny":
        model = _tiny_encoder(tasks, config, run_dir / "tiny-vocab")
    elif config.encoder == window_mlp.ENCODER:
        model = window_mlp.build_window_mlp(tasks, config)
    else:
        path = None if config.encoder == "minilm" else config.encoder
        model = MultiTaskModel.from_pretrained(path, heads, dropout=config.dropout)
    if model.tokenizer is None:
        raise ConfigError(f"encoder {config.encoder!r} comes without a tokenizer")
    return model
