"""A tiny model trains one step on every task of every named corpus: real data, fetched once
per run into the cache (``$PYXTASK_CACHE`` or the default), through the readers, the label
maps, sub-word alignment, collation and the multi-task model."""

from typing import Any

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from pyxtask.data import LabelMap, TaggedSentence, collate, corpora, tokenize_corpus
from pyxtask.models import MultiTaskModel
from tests._corpora import prepare_or_skip

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def char_tokenizer(texts: list[str]) -> Any:
    """A WordPiece tokenizer over single characters: every word of the corpus is covered."""
    chars = sorted({c for text in texts for c in text if not c.isspace()})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars + [f"##{c}" for c in chars])}
    model = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=1000))
    model.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    model.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=model,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


@pytest.mark.network
@pytest.mark.parametrize("name", corpora.list_corpora())
def test_tiny_model_trains_one_step_on_every_task(name):
    if name.startswith("brown-silver"):
        pytest.importorskip("spacy", reason="brown-silver needs the [silver] extra")
    card = prepare_or_skip(name)
    torch.manual_seed(0)
    data: dict[str, list[Any]] = {}
    tasks: dict[str, LabelMap] = {}
    for task, meta in card.tasks.items():
        examples = corpora.load(name, task, "train", limit=8, seed=0)
        kind = "token" if isinstance(examples[0], TaggedSentence) else "sentence"
        tasks[task] = LabelMap(sorted(meta["labels"]), name=task, kind=kind)
        data[task] = examples
    texts = [
        " ".join(ex.words) if isinstance(ex, TaggedSentence) else ex.text
        for examples in data.values()
        for ex in examples
    ]
    tokenizer = char_tokenizer(texts)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=512,
    )
    model = MultiTaskModel.from_config(config, tasks, tokenizer=tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for task, examples in data.items():
        encoded, _ = tokenize_corpus(
            examples, tasks[task], tokenizer, max_length=128, stride=32, warn=False
        )
        batch = collate(encoded, tokenizer.pad_token_id)
        head_before = [p.detach().clone() for p in model.task_parameters(task)]
        out = model(task, batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        assert out.loss is not None and bool(torch.isfinite(out.loss)), (name, task)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        moved = [
            not torch.equal(b, p)
            for b, p in zip(head_before, model.task_parameters(task), strict=True)
        ]
        assert any(moved), (name, task)
