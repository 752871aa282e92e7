"""The TAWT paper's network for its sample-weighted experiment (Chen et al., App. B), as an
encoder of :class:`~pyxtask.models.MultiTaskModel` (``encoder = "window-mlp"``).

The paper represents a word by the concatenated 50-d GloVe vectors of the 5-gram around it
and trains a two-layer network on that: ``phi = ReLU(W x + b)`` with 4,096 hidden units,
one linear head per task. Here:

- the tokenizer is word-level: one position per word, its id the word's row in a vocabulary
  of every word of the run's examples (no labels read; like a pretrained vector table, it
  covers the test words too), ``[PAD]`` and ``[UNK]`` (a word it has never seen) included;
- a word's vector is frozen (a buffer, not a parameter): the mean of the rows of MiniLM's
  input embeddings (``word_embeddings``, 384-d) of the word's sub-words — GloVe is not
  available here — or, for tests, a seeded N(0, 1) vector (``embeddings = "random"``);
  ``[PAD]``, ``[UNK]`` and a word with no sub-words get zeros;
- position ``k``'s state is ``ReLU(phi(concat(v[k - w], ..., v[k + w])))`` with zeros past
  the sentence's ends (and at padding): :func:`window_features`.

So ``phi`` (one ``nn.Linear``) is the model's only trainable shared parameter, and
:class:`~pyxtask.sample_gradients.SampleGradientProducts` covers all of it (coverage 1.0).
The heads read the states like a BERT's, one per word. The encoder is a ``transformers``
model registered with ``AutoModel``: a run's ``best/`` saves and loads as any other; it is
not exported to ONNX (``pyxtask export`` refuses it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

if TYPE_CHECKING:
    from pyxtask.config import TrainConfig
    from pyxtask.models import MultiTaskModel
    from pyxtask.tasks import TaskData

__all__ = [
    "ENCODER",
    "WindowMLPEncoder",
    "WindowMLPEncoderConfig",
    "build_window_mlp",
    "minilm_word_vectors",
    "window_features",
    "word_tokenizer",
]

#: The ``encoder`` value of a configuration that selects this network.
ENCODER = "window-mlp"
_PAD, _UNK = "[PAD]", "[UNK]"


class WindowMLPEncoderConfig(PretrainedConfig):  # type: ignore[no-untyped-call]
    """The encoder's sizes (saved as ``config.json`` with the run's model)."""

    model_type = "pyxtask-window-mlp"

    def __init__(
        self,
        vocab_size: int = 2,
        embedding_size: int = 16,
        window: int = 2,
        hidden_size: int = 4096,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.window = window
        self.hidden_size = hidden_size
        kwargs.setdefault("pad_token_id", 0)
        super().__init__(**kwargs)


def window_features(
    vectors: Tensor, input_ids: Tensor, attention_mask: Tensor, window: int
) -> Tensor:
    """``(batch, seq, (2 * window + 1) * dim)``: at each position the vectors of the words
    ``k - window .. k + window`` side by side, zeros past either end and at padding."""
    e = F.embedding(input_ids, vectors) * attention_mask.unsqueeze(-1).to(vectors.dtype)
    batch, length, dim = e.shape
    padded = F.pad(e, (0, 0, window, window))  # zeros past the sentence's ends
    grams = padded.unfold(1, 2 * window + 1, 1)  # (batch, seq, dim, 2w + 1)
    return grams.transpose(2, 3).reshape(batch, length, (2 * window + 1) * dim)


class WindowMLPEncoder(PreTrainedModel):  # type: ignore[no-untyped-call]
    """Frozen word vectors, 5-gram windows, ``ReLU(phi(.))``; ``last_hidden_state`` per word."""

    config_class = WindowMLPEncoderConfig
    base_model_prefix = "window_mlp"

    def __init__(self, config: WindowMLPEncoderConfig) -> None:
        super().__init__(config)
        # A buffer: saved and loaded with the model, never trained, no gradient products.
        self.register_buffer("word_vectors", torch.zeros(config.vocab_size, config.embedding_size))
        self.phi = nn.Linear((2 * config.window + 1) * config.embedding_size, config.hidden_size)
        self.post_init()  # type: ignore[no-untyped-call]

    def _init_weights(self, module: nn.Module) -> None:
        """Keep torch's default initialisation of ``phi`` (the paper's plain network)."""

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        return_dict: bool = True,
        **_: Any,
    ) -> BaseModelOutput:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        vectors = cast(Tensor, self.word_vectors)
        x = window_features(vectors, input_ids, mask, int(self.config.window))
        return BaseModelOutput(last_hidden_state=F.relu(self.phi(x)))


AutoConfig.register(WindowMLPEncoderConfig.model_type, WindowMLPEncoderConfig, exist_ok=True)
AutoModel.register(WindowMLPEncoderConfig, WindowMLPEncoder, exist_ok=True)


def word_tokenizer(words: Sequence[str]) -> Any:
    """A fast word-level tokenizer: ``[PAD]`` = 0, ``[UNK]`` = 1, then ``words`` in order."""
    import transformers  # noqa: PLC0415
    from tokenizers import Tokenizer, models  # noqa: PLC0415

    vocab = {_PAD: 0, _UNK: 1}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=_UNK))
    fast = cast(Any, transformers).PreTrainedTokenizerFast
    return fast(tokenizer_object=backend, pad_token=_PAD, unk_token=_UNK)


def minilm_word_vectors(words: Sequence[str]) -> Tensor:
    """Each word's mean of MiniLM's input-embedding rows of its sub-words (zeros if none)."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    from pyxtask.models import default_encoder_path  # noqa: PLC0415

    path = default_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    table = AutoModel.from_pretrained(path, local_files_only=True).get_input_embeddings().weight
    out = torch.zeros(len(words), table.shape[1])
    ids = tokenizer(list(words), add_special_tokens=False)["input_ids"] if words else []
    with torch.no_grad():
        for i, pieces in enumerate(ids):
            if pieces:
                out[i] = table[pieces].mean(0)
    return out


def _vocabulary(tasks: Sequence[TaskData]) -> list[str]:
    """Every word of every example of the run (train, dev, test), sorted: no labels read."""
    from pyxtask.config import ConfigError  # noqa: PLC0415
    from pyxtask.data import TaggedSentence  # noqa: PLC0415

    words: set[str] = set()
    for task in tasks:
        if task.kind != "token":
            raise ConfigError(
                f"encoder {ENCODER!r} represents words; task {task.name!r} labels whole texts"
            )
        for e in (*task.train, *task.dev, *task.test):
            if isinstance(e, TaggedSentence):
                words.update(e.words)
    return sorted(words - {_PAD, _UNK})


def build_window_mlp(tasks: Sequence[TaskData], config: TrainConfig) -> MultiTaskModel:
    """The run's model: the word-level tokenizer and vectors of its words, ``phi`` and the
    heads (``phi`` and the heads drawn from torch's global generator: seed it first)."""
    from pyxtask.models import MultiTaskModel  # noqa: PLC0415

    settings = config.window_mlp
    words = _vocabulary(tasks)
    if settings.embeddings == "minilm":
        vectors = minilm_word_vectors(words)
    else:
        g = torch.Generator().manual_seed(config.seed)
        vectors = torch.randn(len(words), settings.random_dim, generator=g)
    table = torch.cat([torch.zeros(2, vectors.shape[1]), vectors])  # [PAD], [UNK]: zeros
    encoder = WindowMLPEncoder(
        WindowMLPEncoderConfig(
            vocab_size=table.shape[0],
            embedding_size=table.shape[1],
            window=settings.window,
            hidden_size=settings.hidden,
        )
    )
    cast(Tensor, encoder.word_vectors).copy_(table)
    heads = [(t.head, t.labels) for t in tasks]
    return MultiTaskModel(encoder, heads, dropout=config.dropout, tokenizer=word_tokenizer(words))
