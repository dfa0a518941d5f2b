"""Tasks: determinism under a seed, disjoint splits, longer hard split, vocab bounds, scoring."""

import math

import pytest
import torch

from experiments.tasks import IGNORE, SPLITS, TASKS, Batch, build_task, row_hash_fraction

GENERATED = ["parity", "addition", "s5", "phop"]


def draw(task, split, n=64, seed=0):
    return task.batch(split, n, torch.Generator().manual_seed(seed))


def rows(batch: Batch) -> set:
    return {tuple(t for t in row if t != -1) for row in torch.where(
        batch.tokens == 0, -1, batch.tokens).tolist()}


@pytest.fixture(scope="module")
def pycode():
    return build_task("pycode", seq_len=32, max_bytes=1_500_000)


def get(name, pycode):
    return pycode if name == "pycode" else build_task(name)


@pytest.mark.parametrize("name", [*GENERATED, "pycode"])
def test_deterministic_under_seed(name, pycode):
    task = get(name, pycode)
    for split in SPLITS:
        a, b, c = draw(task, split, seed=1), draw(task, split, seed=1), draw(task, split, seed=2)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
        assert not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("name", [*GENERATED, "pycode"])
def test_shapes_vocab_and_targets(name, pycode):
    task = get(name, pycode)
    for split in SPLITS:
        batch = draw(task, split, n=32)
        assert batch.tokens.shape == batch.targets.shape and batch.tokens.shape[0] == 32
        assert batch.tokens.dtype == torch.long and batch.difficulty.shape == (32,)
        assert batch.tokens.shape[1] <= task.seq_len
        assert 0 <= batch.tokens.min() and batch.tokens.max() < task.vocab_size
        valid = batch.targets[batch.targets != IGNORE]
        assert valid.numel() > 0 and valid.min() >= 0 and valid.max() < task.vocab_size
        assert not (batch.tokens == task.halt_token_id).any()
        assert not (valid == task.halt_token_id).any() and not (valid == task.pad_id).any()
        assert (batch.targets != IGNORE).any(dim=1).all()  # every sample has a target
    assert task.metric in ("accuracy", "bits_per_byte")


@pytest.mark.parametrize("name", GENERATED)
def test_splits_never_overlap_and_hard_is_longer(name):
    task = build_task(name)
    train, val, hard = (draw(task, s, n=512, seed=int(s == "val")) for s in SPLITS)
    assert not rows(train) & rows(val)
    assert not rows(train) & rows(hard) and not rows(val) & rows(hard)
    assert hard.difficulty.min() > train.difficulty.max()
    lengths = [(b.tokens != task.pad_id).sum(1) for b in (train, val, hard)]
    assert lengths[2].min() > max(lengths[0].max(), lengths[1].max())
    # membership is a content property: val rows hash below the fraction, train rows above
    assert (row_hash_fraction(val.tokens, task.pad_id) < task.val_fraction).all()
    assert (row_hash_fraction(train.tokens, task.pad_id) >= task.val_fraction).all()


def test_parity_targets():
    task = build_task("parity", min_len=3, max_len=6)
    batch = draw(task, "train")
    bits = (batch.tokens == task.ONE).sum(1) % 2
    answers = batch.targets[batch.targets != IGNORE]
    assert torch.equal(answers, bits + task.ZERO)
    assert torch.equal((batch.tokens == task.ZERO).sum(1) + (batch.tokens == task.ONE).sum(1),
                       batch.difficulty)


def test_parity_prefix_targets():
    task = build_task("parity", targets="all")
    batch = draw(task, "train")
    bits = torch.where(batch.tokens == task.ONE, 1, 0)
    bit_positions = (batch.tokens == task.ZERO) | (batch.tokens == task.ONE)
    expected = bits.cumsum(1) % 2 + task.ZERO
    assert torch.equal(batch.targets[bit_positions], expected[bit_positions])
    assert (batch.targets[~bit_positions & (batch.tokens != task.EQ)] == IGNORE).all()


@pytest.mark.parametrize("degree", [3, 5])
def test_s5_degree_sets_vocab(degree):
    task = build_task("s5", degree=degree)
    assert task.vocab_size == task.PERM0 + math.factorial(degree)
    batch = draw(task, "hard", n=32)
    assert batch.tokens.max() < task.vocab_size and batch.targets.max() < task.vocab_size
    with pytest.raises(ValueError, match="degree"):
        build_task("s5", degree=7)


def test_addition_targets_are_the_sum():
    task = build_task("addition", max_digits=3)
    batch = draw(task, "hard", n=16)
    for tokens, targets, n in zip(batch.tokens.tolist(), batch.targets.tolist(),
                                  batch.difficulty.tolist()):
        a = int("".join(str(t - task.DIGIT0) for t in reversed(tokens[:n])))
        b = int("".join(str(t - task.DIGIT0) for t in reversed(tokens[n + 1: 2 * n + 1])))
        answer = [t - task.DIGIT0 for t in targets if t != IGNORE]
        assert int("".join(map(str, reversed(answer)))) == a + b and len(answer) == n + 1


def test_s5_running_composition():
    task = build_task("s5", max_len=5)
    perms = __import__("itertools").permutations(range(5))
    table = list(perms)
    batch = draw(task, "train", n=8)
    for tokens, targets in zip(batch.tokens.tolist(), batch.targets.tolist()):
        state = tuple(range(5))
        for token, target in zip(tokens, targets):
            if token == task.PAD:
                assert target == IGNORE
                continue
            g = table[token - task.PERM0]
            state = tuple(g[state[x]] for x in range(5))
            assert table[target - task.PERM0] == state


def test_phop_follows_pointers():
    task = build_task("phop", max_hops=3, n_pairs=5, n_symbols=9)
    batch = draw(task, "hard", n=16)
    m = task.n_pairs
    for tokens, targets, hops in zip(batch.tokens.tolist(), batch.targets.tolist(),
                                     batch.difficulty.tolist()):
        pointer = dict(zip(tokens[0: 2 * m: 2], tokens[1: 2 * m: 2]))
        current = tokens[2 * m + 1]
        answers = [t for t in targets if t != IGNORE]
        assert len(answers) == hops
        for answer in answers:
            current = pointer[current]
            assert answer == current


def test_pycode_split_by_file_and_reads_stdlib(pycode):
    files = pycode.files_by_split()
    sets = [set(files[s]) for s in SPLITS]
    assert all(sets) and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert any(name.endswith(".py") for name in sets[0])
    assert pycode.files_by_split() == files  # deterministic
    assert pycode.metric == "bits_per_byte" and pycode.vocab_size == 258
    batch = draw(pycode, "train", n=4)
    assert torch.equal(batch.tokens[:, 1:], batch.targets[:, :-1])  # next-byte targets
    assert draw(pycode, "hard", n=2).tokens.shape[1] > batch.tokens.shape[1]
    text = bytes(batch.tokens[0].tolist()).decode("utf-8", errors="replace")
    assert text.isprintable() or "\n" in text or " " in text


def test_score_correct_loss_and_bits_per_byte(pycode):
    task = build_task("parity")
    batch = draw(task, "val", n=8)
    perfect = torch.nn.functional.one_hot(batch.targets.clamp(min=0), task.vocab_size) * 20.0
    scored = task.score(perfect.float(), batch)
    assert scored["correct"].all() and scored["loss"].max() < 1e-6
    wrong = perfect.clone()
    wrong[0] = wrong[0].roll(1, dims=-1)
    assert not task.score(wrong.float(), batch)["correct"][0]
    uniform = torch.zeros(4, 32, pycode.vocab_size)
    pb = draw(pycode, "val", n=4)
    out = pycode.score(uniform, pb)
    assert torch.allclose(out["loss"], torch.full((4,), math.log(258)))
    assert torch.allclose(out["bits_per_byte"], torch.full((4,), math.log2(258)))


def test_unknown_name_and_bad_params():
    with pytest.raises(KeyError, match="known: .*parity"):
        build_task("nope")
    with pytest.raises(ValueError, match="unknown parameter"):
        build_task("parity", bogus=1)
    with pytest.raises(ValueError, match="max_len"):
        build_task("parity", min_len=5, max_len=2)
    with pytest.raises(ValueError, match="hard_min_hops"):
        build_task("phop", max_hops=4, hard_min_hops=3)
    with pytest.raises(ValueError, match="split"):
        build_task("s5").batch("test", 4, torch.Generator())
    assert set(GENERATED + ["pycode"]) <= set(TASKS.names())


def test_evaluation_scores_each_distinct_example_once():
    from experiments.evaluate import distinct

    tokens = torch.tensor([[1, 2], [3, 4], [1, 2], [5, 6], [3, 4]])
    targets = tokens + 10
    batch = distinct(Batch(tokens, targets, torch.arange(5)))
    assert batch.tokens.tolist() == [[1, 2], [3, 4], [5, 6]]  # first occurrences, in order
    assert batch.difficulty.tolist() == [0, 1, 3]
    # same input with a different answer is a different example
    answers = torch.stack([targets[0], targets[0] + 1])
    other = distinct(Batch(tokens[[0, 0]], answers, torch.arange(2)))
    assert len(other) == 2
