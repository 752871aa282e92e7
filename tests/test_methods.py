"""The training methods' steps against independent references on a tiny BERT.

``tests/test_weighting_methods.py`` checks the pure weightings (MGDA, MetaWeighting, GradNorm,
Uncertainty, TAWT) on given Gram matrices. This module checks the *methods*: that a step feeds
its weighting the gradients it should (those of the step's own batches, of the right
parameters, at the right parameter values) and leaves the right combined gradient in
``.grad``. Every reference is computed here, independently of
:class:`~pyxtask.gradients.TaskGradients` and the compiled ops: one ``torch.autograd.grad``
per task of its batch loss (a fresh forward pass), flattened in parameter order, and the
papers' equations written out in float64 NumPy (the min-norm problems solved exactly by
enumerating supports).

Tolerances. The model is float32 and in ``eval()`` mode with dropout 0, so the method's pass
and the reference pass compute the same function. A method's per-task gradient is the same
fp32 backward as the reference's (up to the accumulation order of a few sums); what differs
is what follows it: the ops accumulate dot products, Gram matrices and the combination
``sum_t w_t g_t`` in fp32, the references in float64. Each fp32 sum of P ~ 1.6e4 terms
carries a relative error of a few 1e-7 (eps = 6e-8, pairwise/blocked summation), so gradient
vectors are compared to ``1e-5 * max|expected|`` per entry (``RTOL``), scalars derived from
dot products (cosines, ω, λ's KKT residuals, MetaWeighting's w) to ~1e-5 of their scale.
That is one to two orders above the observed error and far below the effect each test
detects (each test also checks that what it compares actually moved, or that a plausible
wrong wiring would be told apart).

BLAS/OpenMP threads are pinned to one for this module: the models are tiny, and on a busy
2-core machine OpenMP's spin-waits made a forward/backward pass 250 times slower.
"""

import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import transformers

from pyxtask.config import ConfigError
from pyxtask.data import LabeledText, LabelMap, TaggedSentence, collate, tokenize_corpus
from pyxtask.methods import (
    EqualMethod,
    GradNormMethod,
    MetaWeightingMethod,
    MGDAMethod,
    MGDAUBMethod,
    StepContext,
    TAWTStepMethod,
    UncertaintyMethod,
)
from pyxtask.models import MultiTaskModel
from pyxtask.tasks import TaskData
from pyxtask.weighting import TAWT
from tests._weighting_asserts import np_min_norm

transformers.utils.logging.disable_progress_bar()

CPU = torch.device("cpu")
WORDS = [f"w{i}" for i in range(24)]
RTOL = 1e-5  # see the module docstring


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


def word_lists(rng, n):
    return [tuple(rng.choice(WORDS) for _ in range(rng.randint(4, 8))) for _ in range(n)]


def token_examples(lists, labels, rule):
    return [
        TaggedSentence(ws, tuple(labels[rule(w)] for w in ws), f"ex:{i}")
        for i, ws in enumerate(lists)
    ]


def sentence_examples(lists, labels, rule):
    return [LabeledText(" ".join(ws), labels[rule(ws)], f"ex:{i}") for i, ws in enumerate(lists)]


def encode(examples, labels, tokenizer):
    return tokenize_corpus(examples, labels, tokenizer, max_length=16, stride=4)[0]


def tiny_model(tasks, tokenizer, seed):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    heads = [(t.head, t.labels) for t in tasks]
    model = MultiTaskModel.from_config(config, heads, tokenizer=tokenizer, dropout=0.0)
    return model.float().eval()  # eval: the method's pass and the reference's are one function


@dataclass
class Problem:
    tasks: list
    encoded: list
    heldout: list
    model: MultiTaskModel

    def context(self, **kwargs):
        return StepContext(self.model, self.tasks, self.encoded, device=CPU, **kwargs)


SPECS = [  # name, labels, kind, rule of the tag (token) or the label (sentence)
    ("syn.target", ["t0", "t1", "t2"], "token", lambda rule: lambda w: rule[w] % 3),
    ("syn.pos", ["p0", "p1", "p2", "p3"], "token", lambda rule: lambda w: rule[w]),
    ("syn.genre", ["g0", "g1"], "sentence", lambda rule: lambda ws: sum(rule[w] for w in ws) % 2),
]


def problem(tokenizer, seed=0, sizes=(12, 20, 16), *, aligned=(), heldout=(6, 9, 7)):
    """Target (token, 3 tags), a POS-like source (token, 4 tags) and a genre-like sentence
    task (2 labels), each with its own sentences, except the tasks in ``aligned``, which label
    the target's sentences (their sizes are the target's)."""
    rng = random.Random(seed)
    rule = {w: rng.randrange(4) for w in WORDS}
    T = len(sizes)
    target_lists = word_lists(rng, sizes[0])
    tasks, encoded, held = [], [], []
    for t, (name, labels, kind, make_rule) in enumerate(SPECS[:T]):
        lists = target_lists if t == 0 or t in aligned else word_lists(rng, sizes[t])
        label_map = LabelMap(labels, name=name.replace(".", "__"), kind=kind)
        make = token_examples if kind == "token" else sentence_examples
        train = make(lists, labels, make_rule(rule))
        tasks.append(TaskData(name, kind, label_map, train))
        encoded.append(encode(train, label_map, tokenizer))
        if heldout:
            query = make(word_lists(rng, heldout[t]), labels, make_rule(rule))
            held.append(encode(query, label_map, tokenizer))
    return Problem(tasks, encoded, held, tiny_model(tasks, tokenizer, seed))


def random_step(rng, encoded, batch=4):
    return [
        (t, rng.sample(range(len(items)), min(batch, len(items))))
        for t, items in enumerate(encoded)
    ]


# -- independent references ----------------------------------------------------------------------


def shared_params(model):
    return [p for p in model.shared_parameters() if p.requires_grad]


def head_params(model, task):
    return [p for p in model.task_parameters(task.head) if p.requires_grad]


def flat64(tensors, params):
    parts = [torch.zeros_like(p) if g is None else g for p, g in zip(params, tensors, strict=True)]
    return torch.cat([g.detach().reshape(-1) for g in parts]).double().numpy()


def grad_of(params):
    """What a step left in ``.grad``, flattened (zeros where there is none)."""
    return flat64([p.grad for p in params], params)


@dataclass
class TaskRef:
    loss: float
    shared: np.ndarray  # grad of the shared encoder, float64
    head: np.ndarray  # grad of the task's own head


def task_ref(model, task, batch):
    """Task ``task``'s loss on a collated batch (a fresh forward) and its ``autograd.grad``."""
    shared, head = shared_params(model), head_params(model, task)
    loss = model(task.head, batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
    grads = torch.autograd.grad(loss, shared + head, allow_unused=True)
    n = len(shared)
    return TaskRef(loss.item(), flat64(grads[:n], shared), flat64(grads[n:], head))


def reference(model, tasks, encoded, step):
    """One :func:`task_ref` per task of ``step`` (None for the others)."""
    refs = [None] * len(tasks)
    for t, indices in step:
        items = [encoded[t][i] for i in indices]
        refs[t] = task_ref(model, tasks[t], collate(items, model.tokenizer.pad_token_id))
    return refs


def shared_matrix(refs):
    return np.stack([r.shared for r in refs])


def all_matrix(refs):
    """Rows over the encoder and every head (a task's gradient is zero on the other heads),
    in the order of ``StepContext.task_gradients(mode, "all")``."""
    rows = []
    for t, r in enumerate(refs):
        heads = [r.head if s == t else np.zeros_like(o.head) for s, o in enumerate(refs)]
        rows.append(np.concatenate([r.shared, *heads]))
    return np.stack(rows)


def assert_close(actual, expected, rtol=RTOL, what=""):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale, err_msg=what)


def assert_combination(model, tasks, refs, factors):
    """``.grad`` is ``sum_t factors_t grad L_t`` on the encoder, ``factors_t grad L_t`` on
    task t's head."""
    expected = sum(f * r.shared for f, r in zip(factors, refs, strict=True))
    assert_close(grad_of(shared_params(model)), expected, what="shared .grad")
    for t, (f, r) in enumerate(zip(factors, refs, strict=True)):
        assert_close(grad_of(head_params(model, tasks[t])), f * r.head, what=f"head {t} .grad")


def assert_kkt(M, lam, rtol=RTOL):
    """lam on the simplex minimises lam^T M lam iff ``(M lam)_t >= lam^T M lam`` for every t,
    with equality where lam_t > 0 (to ``rtol * max diag M``)."""
    lam = np.asarray(lam, dtype=np.float64)
    tol = rtol * float(np.max(np.diag(M)))
    assert np.all(lam >= 0) and abs(lam.sum() - 1) < 1e-9, lam
    u = M @ lam
    f = lam @ u
    assert np.all(u >= f - tol), (u - f, tol)
    active = lam > 1e-9
    assert np.all(np.abs(u[active] - f) <= tol), (u - f, lam, tol)


def normalizers(G, normalization):
    return {"none": np.ones(len(G)), "l2": np.linalg.norm(G, axis=1)}[normalization]


def advance(ctx, method, optimizer):
    """The trainer's order after a step: optimizer, zero_grad, counters, after_update."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ctx.phase_step += 1
    ctx.global_step += 1
    method.after_update(ctx)


# -- 1. TAWT per step ----------------------------------------------------------------------------


@pytest.mark.parametrize("update_every", [1, 2])
def test_tawt_step_mirror_descent_on_the_steps_own_cosines(tokenizer, update_every):
    p = problem(tokenizer, seed=1)
    T = len(p.tasks)
    ctx = p.context()
    ctx.steps_per_epoch = 5

    def make_tawt(sizes, lr):
        return TAWT(sizes, "normalized-joint", similarity="cosine", c=1.0, lr=lr)

    method = TAWTStepMethod(make_tawt, lr=1.0, update_every=update_every)
    method.bind(ctx)
    eta = 1.0 * update_every / ctx.steps_per_epoch  # the per-update step of the paper's η = 1
    omega = np.full(T, 1.0 / T)  # normalized joint
    assert_close(method.weights()[1], omega)
    optimizer = torch.optim.SGD(p.model.parameters(), lr=0.5)
    rng = random.Random(0)
    pending = []
    for _ in range(2 * update_every):  # two updates of ω
        step = random_step(rng, p.encoded)
        refs = reference(p.model, p.tasks, p.encoded, step)
        p.model.zero_grad(set_to_none=True)
        losses = method.step(ctx, [step])
        assert losses == pytest.approx({t: r.loss for t, r in enumerate(refs)}, rel=1e-6)
        # The step's loss factors are K * ω_t (ω as it stands before this step's update).
        assert_combination(p.model, p.tasks, refs, T * omega)
        G = shared_matrix(refs)
        norms = np.linalg.norm(G, axis=1)
        pending.append(G @ G[0] / (norms * norms[0]))  # s_t = cos(grad L_0, grad L_t)
        advance(ctx, method, optimizer)
        if ctx.phase_step % update_every == 0:
            s = np.mean(pending, axis=0)  # the mean cosine of the update's steps
            pending = []
            omega = omega * np.exp(eta * s)  # eq. 2.8 with g_t = -c s_t, c = 1
            omega /= omega.sum()
        w, om = method.weights()
        np.testing.assert_allclose(om.numpy(), omega, rtol=0, atol=1e-6)
        np.testing.assert_allclose(w.numpy(), T * omega, rtol=0, atol=1e-5)
        assert method.updates == ctx.phase_step // update_every
    # ω really moved (the sources' cosines with the target are below 1): the checks have power.
    assert np.abs(omega - 1.0 / T).max() > 5e-3, omega


# -- 2. MGDA -------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", ["none", "l2"])
def test_mgda_min_norm_weights_of_the_encoder_gradients(tokenizer, normalization):
    p = problem(tokenizer, seed=2)
    T = len(p.tasks)
    ctx = p.context()
    method = MGDAMethod(normalization)
    method.bind(ctx)
    optimizer = torch.optim.SGD(p.model.parameters(), lr=0.5)
    rng = random.Random(1)
    for _ in range(2):
        step = random_step(rng, p.encoded)
        refs = reference(p.model, p.tasks, p.encoded, step)
        p.model.zero_grad(set_to_none=True)
        method.step(ctx, [step])
        w, lam = (x.numpy() for x in method.weights())
        G = shared_matrix(refs)
        n = normalizers(G, normalization)
        Gn = G / n[:, None]
        M = Gn @ Gn.T
        assert_kkt(M, lam)
        lam_ref = np_min_norm(M)
        # The min-norm point is unique; λ is too for a definite M (three independent rows).
        assert_close(lam @ Gn, lam_ref @ Gn, rtol=1e-5, what="min-norm point")
        np.testing.assert_allclose(lam, lam_ref, rtol=0, atol=1e-4)
        np.testing.assert_allclose(w, T * lam, rtol=1e-12)
        # λ is applied to the raw gradients, times T (uniform λ = the summed-loss step).
        assert_combination(p.model, p.tasks, refs, T * lam)
        advance(ctx, method, optimizer)
    assert lam.max() < 1 - 1e-3, lam  # not a vertex: the combination mixes the tasks


# -- 3. MGDA-UB ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_tasks", "normalization"), [(2, "none"), (2, "l2"), (3, "none")])
def test_mgda_ub_min_norm_weights_of_the_representation_gradients(
    tokenizer, num_tasks, normalization
):
    sizes = (10, 10, 10)[:num_tasks]
    p = problem(tokenizer, seed=3, sizes=sizes, aligned=(1, 2), heldout=())
    T, model = num_tasks, p.model
    ctx = p.context()
    assert ctx.aligned() == [(i,) * T for i in range(sizes[0])]
    method = MGDAUBMethod(normalization)
    method.bind(ctx)
    rows = [0, 3, 4, 7, 9, 2]
    p.model.zero_grad(set_to_none=True)
    losses = method.step(ctx, [[(0, rows)]])
    lam = method.weights()[1].numpy()

    # Gram of the gradients with respect to the encoder's output, one encoder pass.
    first = collate([p.encoded[0][r] for r in rows], model.tokenizer.pad_token_id)
    ids, mask = first["input_ids"], first["attention_mask"]
    hidden = model.encode(ids, mask)
    rep, ref_losses, labels = [], [], []
    for t, task in enumerate(p.tasks):
        y = collate([p.encoded[t][r] for r in rows], model.tokenizer.pad_token_id)["labels"]
        labels.append(y)
        loss = model.apply_head(task.head, hidden, mask, y).loss
        ref_losses.append(loss.item())
        (g,) = torch.autograd.grad(loss, hidden, retain_graph=True)
        rep.append(g.reshape(-1).double().numpy())
    assert losses == pytest.approx(dict(enumerate(ref_losses)), rel=1e-6)
    R = np.stack(rep)
    n = normalizers(R, normalization)
    M = (R @ R.T) / np.outer(n, n)
    assert_kkt(M, lam)
    np.testing.assert_allclose(lam, np_min_norm(M), rtol=0, atol=1e-4)
    if T == 2:  # eq. 4's closed form
        lam0 = np.clip((M[1, 1] - M[0, 1]) / (M[0, 0] + M[1, 1] - 2 * M[0, 1]), 0, 1)
        np.testing.assert_allclose(lam, [lam0, 1 - lam0], rtol=0, atol=1e-5)
    assert lam.max() < 1 - 1e-3, lam

    # .grad is the gradient of sum_t T λ_t L_t (separate forward passes per task).
    refs = [
        task_ref(model, task, {"input_ids": ids, "attention_mask": mask, "labels": labels[t]})
        for t, task in enumerate(p.tasks)
    ]
    assert_combination(model, p.tasks, refs, T * lam)


def test_mgda_ub_refuses_tasks_with_other_inputs(tokenizer):
    p = problem(tokenizer, seed=3, sizes=(10, 10, 10), aligned=(1,), heldout=())
    ctx = p.context()
    with pytest.raises(ConfigError) as info:
        MGDAUBMethod().bind(ctx)
    message = str(info.value)
    assert "syn.genre" in message, message
    assert "syn.pos" not in message, message  # it labels the target's sentences


# -- 4. MetaWeighting: which gradients feed eqs. 10-13 -------------------------------------------


def query_indices(ctx, global_step):
    """The query batches ``after_update`` draws at ``global_step`` (one per task, in order)."""
    g = torch.Generator().manual_seed(ctx.seed * 6007 + global_step)
    return [
        (t, torch.randperm(len(items), generator=g)[: ctx.batch_size].tolist())
        for t, items in enumerate(ctx.heldout)
    ]


def np_metaweighting(w, G_q, G_s, alpha, eta):
    T = len(w)
    d = -(eta / T) * (G_q @ G_s.T)  # eq. 10
    lam = np_min_norm(d @ d.T)  # eq. 12
    return w - alpha * (lam @ d)  # eqs. 11 and 13


@pytest.mark.parametrize("parameters", ["shared", "all"])
def test_metaweighting_support_before_and_query_after_the_optimizer_step(tokenizer, parameters):
    p = problem(tokenizer, seed=4)
    T = len(p.tasks)
    ctx = p.context(seed=3, batch_size=4, heldout=p.heldout)
    alpha, eta = 0.5, 1.0  # a large η so that w visibly moves
    method = MetaWeightingMethod(alpha=alpha, eta=eta, query_ratio=0.1, parameters=parameters)
    method.bind(ctx)
    matrix = shared_matrix if parameters == "shared" else all_matrix
    optimizer = torch.optim.SGD(p.model.parameters(), lr=1.0)
    rng = random.Random(2)
    w = np.ones(T)  # the paper's w0
    for _ in range(2):
        step = random_step(rng, p.encoded)
        support = reference(p.model, p.tasks, p.encoded, step)  # at θ^(k-1)
        queries = query_indices(ctx, ctx.global_step + 1)  # what after_update will draw
        stale = reference(p.model, p.tasks, p.heldout, queries)  # the query at θ^(k-1)
        p.model.zero_grad(set_to_none=True)
        method.step(ctx, [step])
        assert_combination(p.model, p.tasks, support, w)  # sum_t w_t g^s_t, heads w_t h_t
        optimizer.step()  # θ^k
        optimizer.zero_grad(set_to_none=True)
        ctx.phase_step += 1
        ctx.global_step += 1
        query = reference(p.model, p.tasks, p.heldout, queries)  # at θ^k
        method.after_update(ctx)
        assert all(q.grad is None for q in p.model.parameters())  # the query pass is no step
        G_s, G_q, G_stale = matrix(support), matrix(query), matrix(stale)
        w_wrong = np_metaweighting(w, G_stale, G_s, alpha, eta)
        w = np_metaweighting(w, G_q, G_s, alpha, eta)
        got = method.weights()[0].numpy()
        np.testing.assert_allclose(got, w, rtol=0, atol=1e-5)
        # Query gradients at θ^(k-1) would give weights the comparison tells apart.
        assert np.abs(w_wrong - w).max() > 1e-3, (w_wrong, w)
    assert np.abs(w - 1).max() > 1e-2, w


# -- 5. GradNorm ---------------------------------------------------------------------------------


def test_gradnorm_weight_gradient_from_the_whole_encoders_norms(tokenizer):
    p = problem(tokenizer, seed=5)
    T = len(p.tasks)
    ctx = p.context()
    alpha = 1.5
    method = GradNormMethod(alpha=alpha, lr=0.025)
    method.bind(ctx)
    (weights,) = method.parameters()
    optimizer = torch.optim.SGD(
        [{"params": p.model.parameters(), "lr": 0.5}, {"params": [weights], "lr": method.lr}]
    )
    rng = random.Random(3)
    L0 = None
    for _ in range(3):
        step = random_step(rng, p.encoded)
        refs = reference(p.model, p.tasks, p.encoded, step)
        w = weights.detach().numpy().copy()
        p.model.zero_grad(set_to_none=True)
        method.step(ctx, [step])
        norms = np.linalg.norm(shared_matrix(refs), axis=1)  # ||grad_W L_t||, W = the encoder
        L = np.array([r.loss for r in refs])
        L0 = L if L0 is None else L0
        ratio = L / L0
        r = ratio / ratio.mean()  # the first step: r = 1
        G = w * norms
        target = G.mean() * r**alpha
        # sign() is decided far beyond the fp32 error of the norms.
        assert np.all(np.abs(G - target) > 1e-3 * G.mean()), (G, target)
        expected = np.sign(G - target) * norms
        np.testing.assert_allclose(weights.grad.numpy(), expected, rtol=1e-5)
        assert_combination(p.model, p.tasks, refs, w)
        advance(ctx, method, optimizer)
        moved = np.maximum(w - method.lr * expected, 1e-8)  # SGD, then Alg. 1's renormalisation
        np.testing.assert_allclose(weights.detach().numpy(), moved * T / moved.sum(), rtol=1e-5)
        assert abs(weights.sum().item() - T) < 1e-12
    assert np.abs(weights.detach().numpy() - 1).max() > 1e-2


# -- 6. Uncertainty ------------------------------------------------------------------------------


def test_uncertainty_gradients_of_the_log_variances_and_the_model(tokenizer):
    p = problem(tokenizer, seed=6)
    ctx = p.context()
    method = UncertaintyMethod(lr=0.01)
    method.bind(ctx)
    (log_vars,) = method.parameters()
    s = np.array([0.4, -0.3, 0.1])
    with torch.no_grad():
        log_vars.copy_(torch.from_numpy(s))
    step = random_step(random.Random(4), p.encoded)
    refs = reference(p.model, p.tasks, p.encoded, step)
    p.model.zero_grad(set_to_none=True)
    method.step(ctx, [step])
    L = np.array([r.loss for r in refs])
    np.testing.assert_allclose(log_vars.grad.numpy(), 0.5 - np.exp(-s) * L, rtol=1e-6)
    assert_combination(p.model, p.tasks, refs, np.exp(-s))
    np.testing.assert_allclose(method.weights()[0].numpy(), np.exp(-s), rtol=1e-12)


# -- 7. Gradient accumulation --------------------------------------------------------------------


def test_mgda_accumulates_micro_batches_into_their_mean_gradient(tokenizer):
    p = problem(tokenizer, seed=7)
    T = len(p.tasks)
    ctx = p.context()
    method = MGDAMethod("none")
    method.bind(ctx)
    rng = random.Random(5)
    micro = [random_step(rng, p.encoded), random_step(rng, p.encoded)]
    parts = [reference(p.model, p.tasks, p.encoded, step) for step in micro]
    mean = [
        TaskRef((a.loss + b.loss) / 2, (a.shared + b.shared) / 2, (a.head + b.head) / 2)
        for a, b in zip(*parts, strict=True)
    ]
    p.model.zero_grad(set_to_none=True)
    losses = method.step(ctx, micro)
    assert losses == pytest.approx({t: r.loss for t, r in enumerate(mean)}, rel=1e-6)
    lam = method.weights()[1].numpy()
    G = shared_matrix(mean)
    assert_kkt(G @ G.T, lam)
    np.testing.assert_allclose(lam, np_min_norm(G @ G.T), rtol=0, atol=1e-4)
    assert_combination(p.model, p.tasks, mean, T * lam)
    # The last micro-batch alone would give other weights: the comparison has power.
    G_last = shared_matrix(parts[1])
    assert np.abs(np_min_norm(G_last @ G_last.T) - lam).max() > 1e-3


def test_equal_accumulates_micro_batches_into_their_mean_gradient(tokenizer):
    p = problem(tokenizer, seed=8)
    ctx = p.context()
    method = EqualMethod()
    method.bind(ctx)
    rng = random.Random(6)
    micro = [random_step(rng, p.encoded), random_step(rng, p.encoded)]
    parts = [reference(p.model, p.tasks, p.encoded, step) for step in micro]
    p.model.zero_grad(set_to_none=True)
    losses = method.step(ctx, micro)
    mean = [
        TaskRef((a.loss + b.loss) / 2, (a.shared + b.shared) / 2, (a.head + b.head) / 2)
        for a, b in zip(*parts, strict=True)
    ]
    assert losses == pytest.approx({t: r.loss for t, r in enumerate(mean)}, rel=1e-6)
    assert_combination(p.model, p.tasks, mean, np.ones(len(p.tasks)))


def test_gradnorm_accumulation_measures_the_norm_of_the_steps_gradient(tokenizer):
    p = problem(tokenizer, seed=0)
    ctx = p.context()
    alpha = 1.5
    method = GradNormMethod(alpha=alpha)
    method.bind(ctx)
    (weights,) = method.parameters()
    rng = random.Random(0)
    micro = [random_step(rng, p.encoded), random_step(rng, p.encoded)]
    parts = [reference(p.model, p.tasks, p.encoded, step) for step in micro]
    mean = [
        TaskRef((a.loss + b.loss) / 2, (a.shared + b.shared) / 2, (a.head + b.head) / 2)
        for a, b in zip(*parts, strict=True)
    ]
    p.model.zero_grad(set_to_none=True)
    method.step(ctx, micro)
    assert_combination(p.model, p.tasks, mean, np.ones(len(p.tasks)))  # this part holds
    norms = np.linalg.norm(shared_matrix(mean), axis=1)  # the step's gradient, per task
    G = norms  # w = 1 and r = 1 at the first step
    assert np.all(np.abs(G - G.mean()) > 1e-2 * G.mean()), G
    # Observed: w.grad = (-5.61, -5.62, +6.45), expected (+7.34, +6.79, -2.31): every sign flips
    # (the third task's two micro-batch gradients nearly cancel; their norms do not).
    np.testing.assert_allclose(weights.grad.numpy(), np.sign(G - G.mean()) * norms, rtol=1e-5)


# -- 8. MetaWeighting on a conflicting task ------------------------------------------------------


def conflict_problem(tokenizer, seed, conflict=True, n_train=32, n_query=16):
    """Three token tasks on their own sentences, one rule ``word -> class`` under three tag
    sets. ``syn.bad``'s *training* tags follow the rule shifted by one class (a permutation of
    its tags); its held-out tags, like every task's, follow the true rule."""
    rng = random.Random(seed)
    rule = {w: rng.randrange(3) for w in WORDS}

    def true(w):
        return rule[w]

    def shifted(w):
        return (rule[w] + 1) % 3

    tasks, encoded, heldout = [], [], []
    for name, labels in [("syn.target", "t"), ("syn.good", "g"), ("syn.bad", "b")]:
        tags = [f"{labels}{i}" for i in range(3)]
        label_map = LabelMap(tags, name=name.replace(".", "__"))
        train_rule = shifted if name == "syn.bad" and conflict else true
        train = token_examples(word_lists(rng, n_train), tags, train_rule)
        query = token_examples(word_lists(rng, n_query), tags, true)
        tasks.append(TaskData(name, "token", label_map, train))
        encoded.append(encode(train, label_map, tokenizer))
        heldout.append(encode(query, label_map, tokenizer))
    return Problem(tasks, encoded, heldout, tiny_model(tasks, tokenizer, seed))


def train_in_own_loop(p, method, seed, steps=30, batch=8):
    """The one obvious call in a plain loop: a method is usable without the trainer."""
    ctx = p.context(seed=seed, batch_size=batch, heldout=p.heldout)
    method.bind(ctx)
    optimizer = torch.optim.AdamW(p.model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        step = [
            (t, torch.randperm(len(items), generator=g)[:batch].tolist())
            for t, items in enumerate(p.encoded)
        ]
        losses = method.step(ctx, [step])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ctx.phase_step += 1
        ctx.global_step += 1
        method.after_update(ctx)
    return losses


# Observed over seeds 0-9 (30 steps): w = (target, good, bad) ends with the bad task 0.27 to
# 0.87 below the lesser of the other two (its w 0.49-1.00, theirs 1.21-1.75). Without the
# conflict the third task's w ends at 1.23-1.66, from 0.17 above to 0.21 below the others',
# and 0.47 to 0.87 above where the conflict leaves it.
@pytest.mark.parametrize("seed", [0, 1])
def test_metaweighting_moves_weight_away_from_a_conflicting_task(tokenizer, seed):
    # η = 0.1, not the paper's 2e-5 (its learning rate): with it w barely moves in a few
    # dozen steps; a larger η is the documented departure (pyxtask.methods.metaweighting).
    def meta():
        return MetaWeightingMethod(alpha=0.5, eta=0.1, query_ratio=0.1)

    p = conflict_problem(tokenizer, seed)
    method = meta()
    losses = train_in_own_loop(p, method, seed)
    assert set(losses) == {0, 1, 2}
    w = method.weights()[0].numpy()
    target, good, bad = w
    assert bad < min(target, good) - 0.2, w
    assert method.updates == 30

    # The conflict is what lowers it: the same problem without it keeps the task's weight up.
    calm = meta()
    train_in_own_loop(conflict_problem(tokenizer, seed, conflict=False), calm, seed)
    assert calm.weights()[0][2] > bad + 0.3, (calm.weights()[0], w)

    equal = EqualMethod()
    train_in_own_loop(conflict_problem(tokenizer, seed), equal, seed)
    w_eq, omega_eq = equal.weights()
    assert w_eq.tolist() == [1.0, 1.0, 1.0]
    assert omega_eq.tolist() == pytest.approx([1 / 3] * 3, abs=1e-15)
