"""MetaXT and XT (``pyxtask.methods.metaxt``) against independent references on a tiny BERT.

1. The meta-gradient of eq. 5: the exact (second-order autograd) and the finite-difference
   (DARTS) α gradients against each other and against central differences of
   α -> L_meta(Θ'(α)), with Θ'(α) = Θ - η ∇_Θ L_train(Θ, α) recomputed here from scratch in
   float64 (the model called directly, losses written out with ``F.log_softmax``).
2. The finite-difference step moves Θ and restores it bit for bit; ``.grad`` is ∇_Θ L_train.
3. The label transfer network's outputs are distributions; so are the rows of its map.
4. XT and MetaXT take the same Θ step; only α's gradient differs.
5. A synthetic pair of tasks whose target labels are a function of the source's labels (with
   noise): MetaXT's label-transfer map recovers the function.
6. Configuration errors.

Tolerances (float64 for 1 and 4). The reference differentiates α -> L_meta numerically with a
central difference of step h = 1e-5: truncation ~h² f''' ~ 1e-10 and rounding ~1e-16 |f| / h
~ 1e-11 against tensors whose largest meta-gradient entries are 7e-4 to 1, so the exact
meta-gradient must match it to 1e-6 of the tensor's largest entry (observed: at most 4e-8).
The finite-difference meta-gradient replaces the mixed derivative ∇_α(∇_Θ L_trainᵀ v) by a
central difference along v with step ε = fd_eps / ||v||, whose truncation error is O(ε²):
relative C·fd_eps², observed C = 0.009 to 0.7 (9e-7 to 7e-5 at fd_eps = 1e-2). The tests allow
C = 5 (5e-4) and check the order itself: a tenth of fd_eps must shrink the error by at least
30 (observed: 100, as O(ε²) says; a first-order error would shrink by 10). The RTN is smooth
(GELU) for that reason: with ReLU, the ±εv passes crossed kinks and φ's finite-difference
meta-gradient was off by 110 % at fd_eps = 1e-2.
"""

import math
import random
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel

from pyxtask.config import ConfigError, TrainConfig, from_mapping
from pyxtask.data import LabelMap, collate
from pyxtask.methods import MetaXTMethod
from pyxtask.methods.metaxt import LabelTransferNetwork
from pyxtask.tasks import TaskData
from tests.test_methods import (
    WORDS,
    Problem,
    encode,
    sentence_examples,
    tiny_model,
    token_examples,
    word_lists,
)

transformers.utils.logging.disable_progress_bar()

IGNORE = LabelMap.ignore_index
H = 1e-5  # the reference's central-difference step in α (see the module docstring)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return transformers.BertTokenizerFast.from_pretrained(folder, local_files_only=True)


# -- tiny problems -------------------------------------------------------------------------------

# name, labels, kind, rule of the tag (token) or the label (sentence); rule[w] in 0..3
TARGET = ("syn.target", ["t0", "t1", "t2"], "token", lambda rule: lambda w: rule[w] % 3)
POS = ("syn.pos", ["p0", "p1", "p2", "p3"], "token", lambda rule: lambda w: rule[w])
CHUNK = ("syn.chunk", ["c0", "c1"], "token", lambda rule: lambda w: rule[w] // 2)
MOOD = ("syn.mood", ["m0", "m1", "m2"], "sentence", lambda r: lambda ws: sum(r[w] for w in ws) % 3)
GENRE = ("syn.genre", ["g0", "g1"], "sentence", lambda r: lambda ws: sum(r[w] for w in ws) % 2)

SETTINGS = {  # the target first, then the sources
    "one-token-source": [TARGET, POS],
    "two-token-sources": [TARGET, POS, CHUNK],
    "sentence": [MOOD, GENRE],
}


def build(tokenizer, specs, sizes, seed=0):
    """Tasks of ``specs`` on their own random sentences of the shared words."""
    rng = random.Random(seed)
    rule = {w: rng.randrange(4) for w in WORDS}
    tasks, encoded = [], []
    for (name, labels, kind, make_rule), n in zip(specs, sizes, strict=True):
        label_map = LabelMap(labels, name=name.replace(".", "__"), kind=kind)
        make = token_examples if kind == "token" else sentence_examples
        train = make(word_lists(rng, n), labels, make_rule(rule))
        tasks.append(TaskData(name, kind, label_map, train))
        encoded.append(encode(train, label_map, tokenizer))
    return Problem(tasks, encoded, [], tiny_model(tasks, tokenizer, seed))


def first_batches(p, batch=6):
    """One step: the first ``batch`` items of every task."""
    return [(t, list(range(min(batch, len(items))))) for t, items in enumerate(p.encoded)]


def method_for(ctx, meta_gradient, **kwargs):
    settings = {"eta": 0.5, "width": 16, "label_dim": 8, **kwargs}
    method = MetaXTMethod(meta_gradient=meta_gradient, **settings)
    method.bind(ctx)
    return method


def perturb_rtn(method, seed=0):
    """Random RTN weights: at its initialisation (last layer zero) the first layers' gradients
    vanish and a check of them would be empty."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.rtn.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


# -- the independent reference -------------------------------------------------------------------


def cross_entropy(logits, labels):
    """Mean -log p(label) over the labelled positions (every sentence of a sentence task)."""
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    keep = labels != IGNORE
    log_p = F.log_softmax(logits[keep], dim=-1)
    return -log_p.gather(1, labels[keep].unsqueeze(1)).mean()


def at_labels(logits, labels):
    """The rows of the labelled tokens (token task) or all sentences, and their labels."""
    if labels.dim() == 1:
        return logits, labels
    keep = labels != IGNORE
    return logits[keep], labels[keep]


class Reference:
    """L_train and L_meta(Θ'(α)) of one step, written out from the paper's eqs. 2-5.

    L_train = CE_target(x'_t) + γ1/S Σ_s CE_s(x_s)
              + γ2/S Σ_s mean_n(-Σ_c ŷ_nc log p_nc),
    p the target head's softmax on source s's labelled tokens (sentences), ŷ = g_α of the
    detached representation (token state, or [CLS]) at the current Θ, the source index and
    the source label; with an RTN φ after encoder layer k, p is read through a forward pass
    with φ applied after layer k (hooked here, not by the method). Θ = encoder + target head;
    Θ' = Θ - η ∇_Θ L_train; L_meta = CE_target(x''_t) at Θ'.
    """

    def __init__(self, p, method, ctx, step):
        self.model, self.method = p.model, method
        pad = p.model.tokenizer.pad_token_id
        batches = dict(step)
        train_part, meta_part = method.split(ctx, batches[0])
        assert set(train_part).isdisjoint(meta_part)
        self.head = p.tasks[0].head
        self.train = collate([p.encoded[0][i] for i in train_part], pad)
        self.meta = collate([p.encoded[0][i] for i in meta_part], pad)
        self.sources = []
        for t in range(1, len(p.tasks)):
            batch = collate([p.encoded[t][i] for i in batches[t]], pad)
            with torch.no_grad():
                hidden = self.model.encode(batch["input_ids"], batch["attention_mask"])
            labels = batch["labels"]
            if labels.dim() == 1:
                features, source_labels = hidden[:, 0], labels
            else:
                features, source_labels = at_labels(hidden, labels)
            self.sources.append((p.tasks[t].head, batch, features, source_labels))
        self.theta = list(self.model.encoder.parameters())
        self.theta += list(self.model.head(self.head).parameters())
        self._adapt = False
        self._hook = None
        if method.rtn is not None:
            layer = self.model.encoder.encoder.layer[method.rtn_layer]
            self._hook = layer.register_forward_hook(self._rtn)

    def _rtn(self, module, args, output):
        if not self._adapt:
            return output
        if isinstance(output, tuple):
            return (output[0] + self.method.rtn.mlp(output[0]), *output[1:])
        return output + self.method.rtn.mlp(output)

    def close(self):
        if self._hook is not None:
            self._hook.remove()

    def encode(self, batch, adapt=False):
        self._adapt = adapt
        try:
            return self.model.encode(batch["input_ids"], batch["attention_mask"])
        finally:
            self._adapt = False

    def target_loss(self, batch):
        hidden = self.encode(batch)
        logits = self.model.head(self.head)(hidden, batch["attention_mask"])
        return cross_entropy(logits, batch["labels"])

    def transfer_terms(self):
        """Each source's soft cross-entropy of the target head against g_α's labels."""
        terms = []
        for s, (_, batch, features, source_labels) in enumerate(self.sources):
            hidden = self.encode(batch, adapt=self.method.rtn is not None)
            logits = self.model.head(self.head)(hidden, batch["attention_mask"])
            log_p = F.log_softmax(at_labels(logits, batch["labels"])[0], dim=-1)
            soft = self.method.ltn(features, s, source_labels)
            terms.append(-(soft * log_p).sum(dim=-1).mean())
        return terms

    def train_loss(self):
        m, S = self.method, len(self.sources)
        loss = self.target_loss(self.train)
        for head, batch, _, _ in self.sources:
            hidden = self.encode(batch)
            logits = self.model.head(head)(hidden, batch["attention_mask"])
            loss = loss + m.gamma1 / S * cross_entropy(logits, batch["labels"])
        return loss + m.gamma2 / S * sum(self.transfer_terms())

    def theta_gradient(self):
        """∇_Θ L_train for every model parameter (zeros where it does not reach)."""
        params = list(self.model.parameters())
        grads = torch.autograd.grad(self.train_loss(), params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]

    def meta_loss(self):
        """L_meta(Θ'), Θ' = Θ - η ∇_Θ L_train, Θ moved in place and put back."""
        grads = torch.autograd.grad(self.train_loss(), self.theta)
        saved = [p.detach().clone() for p in self.theta]
        try:
            with torch.no_grad():
                for p, g in zip(self.theta, grads, strict=True):
                    p.sub_(self.method.eta * g)
                return float(self.target_loss(self.meta))
        finally:
            with torch.no_grad():
                for p, s in zip(self.theta, saved, strict=True):
                    p.copy_(s)

    def joint_alpha_gradient(self):
        """XT's gradient: ∇_α L_train (only the γ2 term reads α)."""
        m = self.method
        loss = m.gamma2 / len(self.sources) * sum(self.transfer_terms())
        grads = torch.autograd.grad(loss, m.meta_parameters(), allow_unused=True)
        params = m.meta_parameters()
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]

    def numeric(self, param, index, h=H):
        """d L_meta(Θ'(α)) / d param[index] by a central difference."""
        with torch.no_grad():
            original = param[index].clone()
            param[index] = original + h
        try:
            plus = self.meta_loss()
            with torch.no_grad():
                param[index] = original - h
            minus = self.meta_loss()
        finally:
            with torch.no_grad():
                param[index] = original
        return (plus - minus) / (2 * h)


def sample_entries(grad, count, seed):
    """The largest entry and ``count`` random ones (index tuples)."""
    g = torch.Generator().manual_seed(seed)
    flat = [int(grad.abs().argmax())]
    flat += torch.randint(grad.numel(), (count,), generator=g).tolist()
    return [tuple(int(i) for i in np.unravel_index(k, grad.shape)) for k in dict.fromkeys(flat)]


def relative_error(a, b):
    """max |a - b| over all tensors, relative to max |b|."""
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
    return diff / max(float(y.abs().max()) for y in b)


# -- 1. the meta-gradient ------------------------------------------------------------------------


CASES = {  # setting, sizes, rtn_layer, fd_eps
    "one-token-source": ("one-token-source", (10, 12), None, 1e-2),
    "two-token-sources": ("two-token-sources", (10, 12, 12), None, 1e-2),
    "sentence": ("sentence", (10, 12), None, 1e-2),
    "rtn": ("one-token-source", (10, 12), 0, 1e-2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exact_and_finite_difference_meta_gradients_match_a_numeric_reference(tokenizer, case):
    setting, sizes, rtn_layer, eps = CASES[case]
    p = build(tokenizer, SETTINGS[setting], sizes, seed=len(case))
    p.model.double()
    ctx = p.context(seed=3)
    ctx.global_step = 5
    step = first_batches(p)
    methods = {
        (mode, e): method_for(ctx, mode, fd_eps=e, rtn_layer=rtn_layer)
        for mode, e in [("exact", eps), ("finite-difference", eps), ("finite-difference", eps / 10)]
    }
    exact = methods["exact", eps]
    if rtn_layer is not None:
        for m in methods.values():
            perturb_rtn(m)
    for m in methods.values():  # one α for all: the networks come from the run's seed
        assert m.ltn is not None and m.ltn.mlp[0].weight.dtype == torch.float64
        for a, b in zip(m.meta_parameters(), exact.meta_parameters(), strict=True):
            assert torch.equal(a, b)
    grads = {key: m.alpha_gradient(ctx, step) for key, m in methods.items()}
    assert len(grads["exact", eps]) == len(exact.meta_parameters())
    for m in methods.values():
        m.close()  # the methods' RTN hooks stay off in the reference (the reference hooks its own)

    ref = Reference(p, exact, ctx, step)
    try:
        params = exact.meta_parameters()
        checked, numeric, analytic, fd_values = 0, [], [], []
        for k, (param, g) in enumerate(zip(params, grads["exact", eps], strict=True)):
            scale = float(g.abs().max())
            assert scale > 0, f"meta-parameter {k} {tuple(param.shape)} has a zero meta-gradient"
            for index in sample_entries(g, 2, seed=k):
                value = ref.numeric(param, index)
                numeric.append(value)
                analytic.append(float(g[index]))
                fd_values.append(float(grads["finite-difference", eps][k][index]))
                assert abs(float(g[index]) - value) <= 1e-6 * scale, (k, index, g[index], value)
                checked += 1
        assert checked >= 2 * len(params)
        # The finite difference against the numeric reference: its O(ε²) truncation.
        np.testing.assert_allclose(fd_values, numeric, rtol=0, atol=5e-4 * max(map(abs, numeric)))
    finally:
        ref.close()

    # FD against exact on every entry: O(ε²), and of that order.
    coarse = relative_error(grads["finite-difference", eps], grads["exact", eps])
    fine = relative_error(grads["finite-difference", eps / 10], grads["exact", eps])
    assert coarse < 5e-4, coarse
    assert fine < coarse / 30, (coarse, fine)
    if rtn_layer is not None:  # φ has its meta-gradient too, and it is not zero
        n_ltn = len(list(exact.ltn.parameters()))
        assert len(params) == n_ltn + len(list(exact.rtn.parameters()))
        assert all(float(g.abs().max()) > 0 for g in grads["exact", eps][n_ltn:])


# -- 2. the finite-difference step leaves Θ bit for bit --------------------------------------------


def assert_close(actual, expected, rtol, what=""):
    """Every tensor within ``rtol`` of the largest entry of all of ``expected``."""
    scale = max(float(e.abs().max()) for e in expected)
    for k, (got, e) in enumerate(zip(actual, expected, strict=True)):
        a = torch.zeros_like(e) if got is None else got
        err = float((a - e).abs().max())
        assert err <= rtol * scale, f"{what} tensor {k} {tuple(e.shape)}: {err} > {rtol} * {scale}"


def model_grads(model):
    return [None if q.grad is None else q.grad.detach().clone() for q in model.parameters()]


def snapshot(params):
    return [q.detach().clone() for q in params]


def test_finite_difference_restores_the_model_bitwise_and_leaves_the_training_gradient(tokenizer):
    p = build(tokenizer, SETTINGS["two-token-sources"], (10, 12, 12), seed=1)  # float32
    ctx = p.context(seed=2)
    method = method_for(ctx, "finite-difference", eta=0.1, lr=0.05)
    step = first_batches(p)
    names = [n for n, _ in p.model.named_parameters()]
    before, alpha = snapshot(p.model.parameters()), snapshot(method.meta_parameters())
    # Record the target head's weight at every forward pass: the step must really move Θ.
    head = p.model.head(p.tasks[0].head)
    weight = head.classifier.weight.detach().clone()
    seen = []
    hook = head.register_forward_pre_hook(lambda m, args: seen.append(m.classifier.weight.clone()))
    try:
        g_alpha = method.alpha_gradient(ctx, step)
    finally:
        hook.remove()
    moved = [w for w in seen if not torch.equal(w, weight)]
    assert len(moved) >= 3, len(moved)  # Θ' (the meta pass), Θ + εv, Θ - εv
    for name, q, b in zip(names, p.model.parameters(), before, strict=True):
        assert torch.equal(q, b), name
    for q, a in zip(method.meta_parameters(), alpha, strict=True):
        assert torch.equal(q, a)
    assert all(q.grad is None for q in method.ltn.parameters())
    assert len(g_alpha) == len(alpha) and any(float(g.abs().max()) > 0 for g in g_alpha)
    ref = Reference(p, method, ctx, step)
    at_old = [g.detach() for g in ref.theta_gradient()]
    assert_close(model_grads(p.model), at_old, 1e-5, ".grad after alpha_gradient")

    p.model.zero_grad(set_to_none=True)
    losses = method.step(ctx, [step])
    assert set(losses) == {0, 1, 2} and all(math.isfinite(v) for v in losses.values())
    for name, q, b in zip(names, p.model.parameters(), before, strict=True):
        assert torch.equal(q, b), name
    for k, (q, a) in enumerate(zip(method.meta_parameters(), alpha, strict=True)):
        assert not torch.equal(q, a), f"LTN tensor {k} did not move"
        assert q.grad is None
    # .grad is ∇_Θ L_train at the new α (Alg. 1: α first, then Θ's gradient), not at the old.
    at_new = [g.detach() for g in ref.theta_gradient()]
    got = model_grads(p.model)
    assert_close(got, at_new, 1e-5, ".grad after step")
    gap = max(float((a - b).abs().max()) for a, b in zip(at_new, at_old, strict=True))
    assert gap > 1e-3 * max(float(b.abs().max()) for b in at_old), gap
    ref.close()
    method.close()


# -- 3. distributions ----------------------------------------------------------------------------


def test_label_transfer_network_gives_a_distribution_per_source_example():
    torch.manual_seed(0)
    sources = [4, 2, 5]
    ltn = LabelTransferNetwork(32, sources, 3, label_dim=8, width=16)
    hidden = 10.0 * torch.randn(50, 32)  # large inputs: saturated logits stay distributions
    outputs = []
    for s, n in enumerate(sources):
        labels = torch.randint(n, (50,))
        out = ltn(hidden, s, labels)
        assert out.shape == (50, 3)
        assert bool((out >= 0).all())
        torch.testing.assert_close(out.sum(dim=-1), torch.ones(50), rtol=0, atol=1e-6)
        outputs.append(ltn(hidden, s, torch.zeros(50, dtype=torch.int64)))
    # One universal network: label 0 of each source is its own input (own embeddings).
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])
    with pytest.raises(ValueError, match="labels on both sides"):
        LabelTransferNetwork(32, [], 3)


RARE = ("syn.rare", ["r0", "r1", "r2"], "token", lambda rule: lambda w: rule[w] % 2)  # no r2


def test_label_transfer_map_rows_are_mean_distributions(tokenizer):
    p = build(tokenizer, [TARGET, POS, RARE], (6, 10, 10), seed=2)
    ctx = p.context(seed=1, batch_size=4)
    method = method_for(ctx, "finite-difference", map_examples=100)  # every source item
    records = method.label_transfer_map(ctx)
    assert [r["source"] for r in records] == ["syn.pos", "syn.rare"]
    for s, record in enumerate(records):
        task = p.tasks[s + 1]
        assert record["target"] == "syn.target" and record["target_labels"] == ["t0", "t1", "t2"]
        assert record["source_labels"] == list(task.labels.labels)
        # The reference: every labelled token of every item, g_α's mean output per label.
        sums = torch.zeros(len(task.labels), 3, dtype=torch.float64)
        counts = torch.zeros(len(task.labels), dtype=torch.int64)
        with torch.no_grad():
            for item in p.encoded[s + 1]:
                batch = collate([item], p.model.tokenizer.pad_token_id)
                hidden = p.model.encode(batch["input_ids"], batch["attention_mask"])
                features, labels = at_labels(hidden, batch["labels"])
                sums.index_add_(0, labels, method.ltn(features, s, labels).double())
                counts += torch.bincount(labels, minlength=len(task.labels))
        assert record["counts"] == counts.tolist()
        for row, total, n in zip(record["map"], sums, counts.tolist(), strict=True):
            if n == 0:  # no example: a row of nulls (NaN in the JSON-less sense)
                assert row == [None, None, None], row
                continue
            assert min(row) >= 0 and abs(sum(row) - 1) < 1e-6, row
            np.testing.assert_allclose(row, (total / n).numpy(), rtol=0, atol=1e-6)
    assert records[1]["counts"][2] == 0  # r2 never occurs: the check above saw an empty row
    method.close()


def test_split_is_a_seeded_partition_of_the_target_batch(tokenizer):
    p = build(tokenizer, [TARGET, POS], (10, 4), seed=0)
    ctx = p.context(seed=4)
    method = MetaXTMethod(meta_fraction=0.25)
    batch = [9, 2, 7, 4, 0, 5, 3, 8]
    train, meta = method.split(ctx, batch)
    assert sorted(train + meta) == sorted(batch) and not set(train) & set(meta)
    assert len(meta) == 2
    assert method.split(ctx, batch) == (train, meta)  # seeded by the run's seed and step
    splits = set()
    for step in range(8):
        ctx.global_step = step
        splits.add(tuple(method.split(ctx, batch)[1]))
    assert len(splits) > 1
    assert method.split(ctx, [3]) == ([3], [3])  # one example serves as both


# -- 4. XT and MetaXT: one Θ step, two α gradients -----------------------------------------------


def capture_alpha_gradient(method):
    """Record the gradient α's Adam steps on."""
    used = []
    step = method.optimizer.step

    def recording(*args, **kwargs):
        used.append([q.grad.detach().clone() for q in method.ltn.parameters()])
        return step(*args, **kwargs)

    method.optimizer.step = recording
    return used


def test_xt_and_metaxt_take_the_same_theta_step_and_differ_only_in_alphas(tokenizer):
    p = build(tokenizer, SETTINGS["two-token-sources"], (10, 12, 12), seed=4)
    p.model.double()
    ctx = p.context(seed=5)
    step = first_batches(p)
    out, methods = {}, {}
    runs = [("none", None), ("finite-difference", None), ("exact", None)]
    for mode, kernel in [*runs, ("none", SDPBackend.MATH)]:
        method = method_for(ctx, mode, lr=0.0)  # α stays where it is
        alpha = snapshot(method.meta_parameters())
        used = capture_alpha_gradient(method)
        p.model.zero_grad(set_to_none=True)
        if kernel is None:
            losses = method.step(ctx, [step])
        else:
            with sdpa_kernel(kernel):
                losses = method.step(ctx, [step])
        assert len(used) == 1
        for q, a in zip(method.meta_parameters(), alpha, strict=True):
            assert torch.equal(q, a)
        out[mode if kernel is None else "none-math"] = (model_grads(p.model), used[0], losses)
        methods[mode] = method
        method.close()
    xt, fd, exact = out["none"], out["finite-difference"], out["exact"]
    ref = Reference(p, methods["exact"], ctx, step)  # every method's α is the same
    assert xt[2] == fd[2] == exact[2]  # the same losses

    # The same ∇_Θ L_train: bitwise for XT and the finite difference (one code path, Θ
    # restored bit for bit). The exact mode runs its passes under the math attention kernel
    # (flash attention has no second derivative): bitwise XT's under that kernel, and equal
    # to rounding (observed 1.7e-16 of the largest entry) to XT's under the default kernel.
    def same(a, b):
        return all(
            (x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b, strict=True)
        )

    assert same(xt[0], fd[0])
    assert same(out["none-math"][0], exact[0])
    assert_close(exact[0], xt[0], 1e-12, "exact vs XT .grad")
    assert_close(xt[0], [g.detach() for g in ref.theta_gradient()], 1e-12, "XT .grad")
    # α's gradients: XT descends ∇_α L_train, MetaXT the meta-gradient.
    assert_close(xt[1], [g.detach() for g in ref.joint_alpha_gradient()], 1e-12, "XT's α grad")
    assert_close(fd[1], exact[1], 5e-4, "MetaXT's α grad, FD vs exact")
    # ... which is the numeric meta-gradient (checked at each tensor's largest entry) ...
    params = methods["exact"].meta_parameters()
    entries = [sample_entries(g, 0, 0)[0] for g in exact[1]]
    numeric = [ref.numeric(q, i) for q, i in zip(params, entries, strict=True)]
    largest = [float(g[i]) for g, i in zip(exact[1], entries, strict=True)]
    np.testing.assert_allclose(largest, numeric, rtol=1e-6)
    ref.close()
    # ... and another vector than XT's.
    assert relative_error(xt[1], exact[1]) > 0.5, relative_error(xt[1], exact[1])


def capture_rtn_gradient(method):
    """Record the gradient φ's Adam steps on."""
    used = []
    step = method.rtn_optimizer.step

    def recording(*args, **kwargs):
        used.append([q.grad.detach().clone() for q in method.rtn.parameters()])
        return step(*args, **kwargs)

    method.rtn_optimizer.step = recording
    return used


# Θ's backward at the new α runs before φ's step and reads φ's pass: had it reached φ's .grad,
# φ would step on ∇_φ γ2 CE(log p, ŷ(α_new) - ŷ(α_old)) on top of its meta-gradient (10 % of it
# at lr = 0.05), and XT's on twice its gradient.
@pytest.mark.parametrize("mode", ["exact", "finite-difference", "none"])
def test_rtn_steps_on_its_meta_gradient(tokenizer, mode):
    p = build(tokenizer, SETTINGS["one-token-source"], (10, 12), seed=3)
    p.model.double()
    ctx = p.context(seed=3)
    step = first_batches(p)
    method = method_for(ctx, mode, rtn_layer=0, lr=0.05)
    perturb_rtn(method)
    n = len(list(method.ltn.parameters()))
    expected = method.alpha_gradient(ctx, step)[n:]
    used = capture_rtn_gradient(method)
    method.step(ctx, [step])
    method.close()
    assert len(used) == 1
    assert relative_error(used[0], expected) < 1e-10, relative_error(used[0], expected)


# -- 5. a coarse target labelled by a function of a fine source's labels -------------------------

FINE = [f"f{i}" for i in range(6)]
COARSE = ["c0", "c1", "c2"]
MAPPING = [1, 2, 0, 2, 0, 1]  # m: fine source label -> coarse target label


def transfer_problem(tokenizer, seed, n_target=12, n_source=120, noise=0.1):
    """A source tagging every word with its fine class, a target tagging it with m(class),
    each target tag replaced by a random one with probability ``noise``."""
    rng = random.Random(seed)
    order = WORDS[:]
    rng.shuffle(order)
    fine = {w: i % len(FINE) for i, w in enumerate(order)}  # 4 words per fine class

    def coarse(w):
        return rng.randrange(len(COARSE)) if rng.random() < noise else MAPPING[fine[w]]

    target = token_examples(word_lists(rng, n_target), COARSE, coarse)
    source = token_examples(word_lists(rng, n_source), FINE, lambda w: fine[w])
    tasks, encoded = [], []
    for name, labels, train in [("syn.coarse", COARSE, target), ("syn.fine", FINE, source)]:
        label_map = LabelMap(labels, name=name.replace(".", "__"))
        tasks.append(TaskData(name, "token", label_map, train))
        encoded.append(encode(train, label_map, tokenizer))
    return Problem(tasks, encoded, [], tiny_model(tasks, tokenizer, seed))


def train_transfer(p, method, seed, steps, *, batch=8, lr=3e-3):
    """MetaXT's loop without the trainer: the method's step, then AdamW on the model."""
    p.model.train()  # dropout is 0: train mode changes nothing but is the real setting
    ctx = p.context(seed=seed, batch_size=batch)
    method.bind(ctx)
    optimizer = torch.optim.AdamW(p.model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        step = [
            (t, torch.randperm(len(items), generator=g)[:batch].tolist())
            for t, items in enumerate(p.encoded)
        ]
        method.step(ctx, [step])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ctx.phase_step += 1
        ctx.global_step += 1
    (record,) = method.label_transfer_map(ctx)
    return record


def map_accuracy(record):
    """Share of source labels whose map row's argmax is m(label)."""
    assert record["source_labels"] == FINE and record["target_labels"] == COARSE
    assert all(n > 0 for n in record["counts"])
    return float(
        np.mean([int(np.argmax(row)) == m for row, m in zip(record["map"], MAPPING, strict=True)])
    )


# Observed (150 steps of 8 + 8 sentences, α's Adam at 3e-3, η = 0.1, 2-3 s a run): MetaXT's map
# gives m for 6 of 6 source labels on seeds 0-6 and 5 of 6 on seed 7, with the exact
# meta-gradient as with the finite difference; XT's for 4, 6 and 2 of 6 on seeds 0-2 (its α
# descends L_train: g_α chases the target head's own predictions on the source and can
# collapse onto one target label); the untrained network's argmax for 0 to 3 of 6 (seeds 0-7).
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metaxt_recovers_a_noisy_label_function_and_reports_xt(tokenizer, seed):
    accuracy = {}
    for mode, steps in [("untrained", 0), ("finite-difference", 150), ("none", 150)]:
        p = transfer_problem(tokenizer, seed)
        gradient = "finite-difference" if mode == "untrained" else mode
        method = MetaXTMethod(meta_gradient=gradient, lr=3e-3, eta=0.1, width=32, label_dim=16)
        started = time.perf_counter()
        accuracy[mode] = map_accuracy(train_transfer(p, method, seed, steps))
        accuracy[f"{mode} s"] = round(time.perf_counter() - started, 1)
        method.close()
    report = f"seed {seed}: label-transfer map accuracy (share of m recovered) {accuracy}"
    print(report)
    assert accuracy["untrained"] < 0.7, report  # the check has power
    assert accuracy["finite-difference"] >= 0.7, report


# -- 6. configuration errors ---------------------------------------------------------------------


def test_sources_of_another_kind_are_a_config_error_at_bind(tokenizer):
    p = build(tokenizer, [TARGET, POS, GENRE], (4, 4, 4), seed=0)
    with pytest.raises(ConfigError) as info:
        MetaXTMethod().bind(p.context())
    message = str(info.value)
    assert "syn.genre" in message and "sentence" in message and "syn.target" in message
    assert "syn.pos" not in message  # the token source is fine
    alone = build(tokenizer, [TARGET], (4,), seed=0)
    with pytest.raises(ConfigError, match="at least one source"):
        MetaXTMethod(meta_gradient="none").bind(alone.context())
    with pytest.raises(ConfigError, match="rtn_layer"):
        MetaXTMethod(rtn_layer=2).bind(build(tokenizer, [TARGET, POS], (4, 4)).context())


def test_bad_settings_are_errors(tokenizer):
    for method in ("metaxt", "xt"):
        with pytest.raises(ConfigError, match="one batch per step"):
            TrainConfig(method=method, accumulate=2).validate()
    TrainConfig(method="metaxt", accumulate=1).validate()
    with pytest.raises(ConfigError, match=r"metaxt\.meta_gradient"):
        from_mapping({"method": "metaxt", "metaxt": {"meta_gradient": "second-order"}})
    with pytest.raises(ConfigError, match=r"metaxt\.meta_fraction"):
        from_mapping({"method": "metaxt", "metaxt": {"meta_fraction": 1.0}})
    with pytest.raises(ValueError, match="meta_gradient"):
        MetaXTMethod(meta_gradient="second-order")
    with pytest.raises(ValueError, match="meta_fraction"):
        MetaXTMethod(meta_fraction=0.0)
    p = build(tokenizer, [TARGET, POS], (6, 6), seed=0)
    ctx = p.context()
    method = method_for(ctx, "finite-difference")
    with pytest.raises(ValueError, match="one batch per step"):
        method.step(ctx, [first_batches(p), first_batches(p)])
