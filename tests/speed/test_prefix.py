"""cache_frozen_prefix: replayed training equals uncached training; the prefix follows freezing."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfreeze as tf
from torchfreeze.errors import ArgumentError, ArgumentTypeError, SelectorError
from torchfreeze.speed.prefix import PrefixCache, cache_frozen_prefix

CALLS: dict[int, int] = {}


class Counting(nn.Module):
    """A Linear + GELU block that counts its forward calls (outside itself: a module that sets its
    own attributes when it runs is never replayed, see the test of that below)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        CALLS[id(self)] = 0  # an id can be reused after an earlier module is freed

    @property
    def calls(self) -> int:
        return CALLS.get(id(self), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CALLS[id(self)] = self.calls + 1
        return F.gelu(self.linear(x))


def blocks(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(Counting(6, 16), Counting(16, 16), Counting(16, 16), nn.Linear(16, 3))


class Skip(nn.Module):
    """The head reads the stem's output directly: replaying only the boundary would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(6, 16)
        self.mid = nn.Linear(16, 16)
        self.block = nn.Linear(16, 16)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        return self.head(torch.cat([self.block(self.mid(s)), s], dim=-1))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)


def train(model: nn.Module, epochs: int, *, on_epoch: object = None) -> list[float]:
    x, y = data()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(2)
    losses = []
    for epoch in range(epochs):
        if callable(on_epoch):
            on_epoch(epoch, model, opt)
        for idx in torch.randperm(48, generator=g).split(8):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def test_replayed_training_equals_uncached_training_and_skips_the_prefix() -> None:
    plain, cached = blocks(), blocks()
    for m in (plain, cached):
        tf.freeze(m, "0", "1", mode="eval")
    prefix = cache_frozen_prefix(cached)
    losses_plain, losses_cached = train(plain, 3), train(cached, 3)
    torch.testing.assert_close(losses_cached, losses_plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(plain.parameters(), cached.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    stats = prefix.stats()
    assert (stats.boundary, stats.frozen_groups) == ("1", 2)
    assert (stats.captured_batches, stats.replayed_batches, stats.hits, stats.misses) == (6, 12, 96, 48)
    assert cached[0].calls == cached[1].calls == 6 + 1  # the capture epoch, and the verification pass
    assert cached[2].calls == 18 + 2  # and both passes of the verification
    assert stats.bytes > 0


def test_the_prefix_follows_freezing_as_training_goes() -> None:
    model = blocks()
    prefix = cache_frozen_prefix(model, groups=[["0"], ["1"], ["2"], ["3"]])
    boundaries = []

    def schedule(epoch: int, m: nn.Module, _opt: object) -> None:
        if epoch == 1:
            tf.freeze(m, "0", mode="eval")
        if epoch == 3:
            tf.freeze(m, "1", mode="eval")
        boundaries.append(prefix.boundary)

    reference = blocks()

    def same_schedule(epoch: int, m: nn.Module, _opt: object) -> None:
        if epoch == 1:
            tf.freeze(m, "0", mode="eval")
        if epoch == 3:
            tf.freeze(m, "1", mode="eval")

    torch.testing.assert_close(train(model, 5, on_epoch=schedule), train(reference, 5, on_epoch=same_schedule))
    assert boundaries == [None, None, "0", "0", "1"]
    assert prefix.stats().frozen_groups == 2
    assert prefix.stats().replayed_batches == 6 + 6  # epoch 2 at "0", epoch 4 at "1"
    # block 0 runs in epochs 0 and 1, once to verify its replay, then never: the capture at the new
    # boundary (epoch 3) replays the stored prefix and runs only block 1; then once more to verify
    assert model[0].calls == 6 + 6 + 1 + 1
    # block 1: epochs 0-1, both verification passes and epoch 2 (it trained then), epoch 3's capture,
    # and the full pass of the second verification
    assert model[1].calls == 6 + 6 + 2 + 6 + 6 + 1


def test_a_trainable_or_random_prefix_is_not_cached() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    model[0].requires_grad_(False)
    prefix = cache_frozen_prefix(model, groups=[["0", "1"], ["2"]])
    x = torch.randn(4, 6)
    model.train()
    model(x), model(x)
    assert prefix.stats().frozen_groups == 0 and prefix.stats().uncached_batches == 2
    tf.pin_mode(model, "1", mode="eval")
    model(x), model(x)
    assert prefix.stats().replayed_batches == 1


def test_inputs_that_require_grad_are_not_cached() -> None:
    model = blocks()
    tf.freeze(model, "0", mode="eval")
    prefix = cache_frozen_prefix(model)
    x = torch.randn(4, 6, requires_grad=True)
    model(x).sum().backward()
    model(x).sum().backward()
    assert x.grad is not None and prefix.stats().uncached_batches == 2


def test_new_weights_in_the_prefix_start_a_new_store() -> None:
    model = blocks()
    tf.freeze(model, "0", mode="eval")
    prefix = cache_frozen_prefix(model)
    x = torch.randn(4, 6)
    model(x)
    other = blocks(seed=5)
    model[0].load_state_dict(other[0].state_dict())
    expected = nn.Sequential(*[copy.deepcopy(m) for m in model])
    torch.testing.assert_close(model(x), expected(x))
    assert prefix.stats().misses == 8


def test_a_prefix_read_by_another_path_is_refused_with_a_warning_and_stays_correct() -> None:
    model = Skip()
    tf.freeze(model, "stem", "mid", mode="eval")
    prefix = cache_frozen_prefix(model, groups=[["stem"], ["mid"], ["block", "head"]])
    x = torch.randn(5, 6)
    expected = model(x)
    with pytest.warns(UserWarning, match="changes the model's output"):
        got = model(x)
    torch.testing.assert_close(got, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(model(x), expected)
    assert "changes the model's output" in next(iter(prefix.stats().refused.values()))
    assert prefix.stats().replayed_batches == 0


def test_a_random_layer_in_no_group_is_named_when_the_replay_is_refused() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 8), nn.Linear(8, 3))
    assert tf.layer_groups(model) == [["0"], ["2"], ["3"]]  # the Dropout has no parameters: no group
    tf.freeze(model, "0", "2", mode="eval")
    prefix = cache_frozen_prefix(model)
    x = torch.randn(5, 6)
    model(x)
    with pytest.warns(UserWarning, match=r"layer '1' \(Dropout, p=0.5\).*pin_mode\(model, '1'"):
        model(x)
    assert prefix.stats().replayed_batches == 0


def test_dynamic_padding_keeps_one_store_per_length_within_the_budget() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    tf.freeze(model, "0", mode="eval")
    prefix = cache_frozen_prefix(model)
    short, long = torch.randn(3, 5, 4), torch.randn(3, 7, 4)
    expected = [model[2](model[1](model[0](x))) for x in (short, long)]
    for _ in range(3):
        for x, want in zip((short, long), expected):
            torch.testing.assert_close(model(x), want)
    stats = prefix.stats()
    assert (stats.captured_batches, stats.replayed_batches, stats.hits, stats.misses) == (2, 4, 12, 6)
    small = cache_frozen_prefix(tmp := nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), max_bytes=3 * 5 * 8 * 4)
    tf.freeze(tmp, "0", mode="eval")
    for x in (short, long, short, long):
        tmp(x)
    assert small.stats().bytes <= 3 * 7 * 8 * 4 and small.stats().replayed_batches == 0  # one length at a time


def test_a_second_prefix_cache_on_one_model_is_refused_until_the_first_is_removed() -> None:
    model = blocks()
    first = cache_frozen_prefix(model)
    with pytest.raises(ArgumentError, match="already has a prefix cache.*remove"):
        cache_frozen_prefix(model)
    assert len(model._forward_pre_hooks) == 1
    first.remove()
    cache_frozen_prefix(model).remove()


def test_a_model_with_a_prefix_cache_is_garbage_collected() -> None:
    import gc
    import weakref

    model = blocks()
    cache_frozen_prefix(model)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_remove_leaves_no_hook_and_no_stub() -> None:
    model = blocks()
    tf.freeze(model, "0", mode="eval")
    prefix = cache_frozen_prefix(model)
    x = torch.randn(4, 6)
    model(x), model(x)
    prefix.remove()
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all("forward" not in m.__dict__ for m in model.modules())
    calls = model[0].calls
    model(x)
    assert model[0].calls == calls + 1


def test_an_exception_in_a_replayed_forward_leaves_no_stub() -> None:
    model = blocks()
    tf.freeze(model, "0", "1", mode="eval")
    cache_frozen_prefix(model)
    x = torch.randn(4, 6)
    model(x), model(x)
    with pytest.raises(RuntimeError):
        model(torch.randn(4, 7))
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_a_hugging_face_encoder_replays_to_the_same_logits() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(config, add_pooling_layer=False)
    model = tf.Composite(tf.compose.HFEncoder(bert), nn.Linear(16, 3))
    groups = tf.layer_groups(model)
    tf.freeze(model, *groups[0], *groups[1], *groups[2], mode="eval")  # embeddings, layer.0, layer.1
    prefix = cache_frozen_prefix(model)
    batch = {"input_ids": torch.randint(1, 50, (6, 7)), "attention_mask": torch.ones(6, 7, dtype=torch.int64)}
    batch["attention_mask"][0, 5:] = 0
    model.train()  # dropout in layer.2 is live: the same seed gives the same masks
    torch.manual_seed(3)
    first = model(batch)
    torch.manual_seed(3)
    second = model(batch)
    torch.testing.assert_close(second, first, rtol=1e-5, atol=1e-6)
    assert prefix.boundary == groups[2][0] and prefix.stats().replayed_batches == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"max_bytes": "1G"}, ArgumentTypeError, "max_bytes", id="max-bytes-type"),
        pytest.param({"max_bytes": -1}, ArgumentError, "non-negative", id="max-bytes-negative"),
        pytest.param({"groups": "0"}, ArgumentTypeError, "list of layer groups", id="groups-string"),
        pytest.param({"groups": [["0", "1", "2", "3"]]}, ArgumentError, "at least two", id="one-group"),
        pytest.param({"groups": [["nope"], ["3"]]}, SelectorError, "nope", id="unknown-module"),
    ],
)
def test_bad_arguments_raise_and_install_nothing(kwargs: dict[str, object], error: type, match: str) -> None:
    model = blocks()
    with pytest.raises(error, match=match):
        cache_frozen_prefix(model, **kwargs)  # type: ignore[arg-type]
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_a_non_module_is_an_argument_type_error() -> None:
    with pytest.raises(ArgumentTypeError, match="expected a torch.nn.Module"):
        cache_frozen_prefix([1, 2])  # type: ignore[arg-type]


def test_repr_and_stats_are_plain() -> None:
    prefix = cache_frozen_prefix(blocks())
    assert isinstance(prefix, PrefixCache) and "boundary=None" in repr(prefix)
    assert prefix.stats().to_dict()["hit_rate"] == 0.0


def test_unfreezing_a_prefix_group_shrinks_the_prefix_at_once() -> None:
    model = blocks()
    tf.freeze(model, "0", "1", mode="eval")
    prefix = cache_frozen_prefix(model)
    x = torch.randn(4, 6)
    model(x), model(x)
    assert prefix.boundary == "1" and prefix.stats().replayed_batches == 1
    tf.unfreeze(model, "1")
    out = model(x)
    assert out.requires_grad and prefix.stats().frozen_groups == 1
    out.sum().backward()
    assert model[1].linear.weight.grad is not None  # its gradient flows: it was not replayed


class Gate(nn.Module):
    """A frozen block that keeps state in an attribute, which the head reads."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 8)
        self.last_gate = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_gate = float(x.mean())
        return self.linear(x)


class GateModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gate, self.head = Gate(), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate(x)) * self.gate.last_gate


def test_a_module_that_sets_its_own_attributes_when_it_runs_is_not_replayed() -> None:
    model = GateModel()
    tf.freeze(model, "gate", mode="eval")
    prefix = cache_frozen_prefix(model)
    a, b = torch.randn(4, 6), torch.randn(4, 6) + 1
    with pytest.warns(UserWarning, match="sets its own attributes"):
        model(a)
    model(b)
    torch.testing.assert_close(model(a), model.head(model.gate.linear(a)) * float(a.mean()))
    assert prefix.stats().replayed_batches == 0


class PosEmbed(nn.Module):
    """A ViT-like model: a top-level parameter (a position embedding) next to the modules."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 8)
        self.pos = nn.Parameter(torch.randn(8) * 0.1)
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos
        for block in self.blocks:
            h = torch.relu(block(h))
        return self.head(h)


def test_a_parameter_named_in_a_group_is_watched_and_unfreezing_it_shrinks_the_prefix() -> None:
    model, reference = PosEmbed(), PosEmbed()
    groups = tf.layer_groups(model)
    assert "pos" in groups[0]
    for m in (model, reference):
        tf.freeze(m, "embed", "pos", "blocks.0", mode="eval")
    prefix = cache_frozen_prefix(model)

    def unfreeze_pos(epoch: int, m: nn.Module, opt: torch.optim.Optimizer) -> None:
        if epoch == 2:
            tf.unfreeze(m, "pos")
            opt.add_param_group({"params": [m.pos]})

    losses = train(model, 4, on_epoch=unfreeze_pos)
    torch.testing.assert_close(losses, train(reference, 4, on_epoch=unfreeze_pos), rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.pos, PosEmbed().pos)  # it trained after the unfreeze
    assert prefix.stats().replayed_batches > 0


@pytest.mark.parametrize(
    ("groups", "match"),
    [
        pytest.param([["embed"], ["blocks.0"], ["blocks.1", "head"]], "'pos' in none", id="a-parameter-left-out"),
        pytest.param([["embed", "pos"], [], ["blocks", "head"]], r"groups\[1\]=\[\]", id="an-empty-group"),
        pytest.param([["embed", "pos", "blocks.0"], ["blocks", "head"]], "in group 0 and in group 1", id="overlap"),
    ],
)
def test_groups_that_leave_out_share_or_name_nothing_are_refused(groups: list[list[str]], match: str) -> None:
    model = PosEmbed()
    with pytest.raises(ArgumentError, match=match):
        cache_frozen_prefix(model, groups=groups)
    assert not model._forward_pre_hooks


def test_a_loose_dropout_switching_to_train_mode_is_not_replayed_stale() -> None:
    def build() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 8), nn.Linear(8, 3))

    model, reference = build(), build()
    for m in (model, reference):
        tf.freeze(m, "0", "2", mode="eval")  # the Dropout '1' belongs to no group and is not pinned
    prefix = cache_frozen_prefix(model)
    x = torch.randn(8, 6)
    for m in (model, reference):
        m.eval()
        with torch.no_grad():
            m(x), m(x)  # evaluation passes first: captured and verified with the dropout off
        m.train()
    with pytest.warns(UserWarning, match=r"layer '1' \(Dropout"):  # the train-mode replay is refused
        for step in range(3):  # a new dropout mask every step
            torch.manual_seed(step)
            got = model(x)
            torch.manual_seed(step)
            torch.testing.assert_close(got, reference(x))
    assert prefix.stats().replayed_batches == 1  # only the second evaluation pass


def test_a_model_called_twice_per_step_with_a_trainable_batchnorm_after_the_prefix() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    tf.freeze(model, "0", mode="eval")
    cache_frozen_prefix(model, groups=[["0"], ["1", "2"], ["3"]])
    x = torch.randn(8, 6)
    for _ in range(3):  # two views of one batch, one backward: the second call must not touch the first graph
        loss = model(x).sum() + model(x).square().mean()
        loss.backward()


def test_switching_between_train_and_eval_keeps_a_store_per_mode() -> None:
    model = blocks()
    tf.freeze(model, "0", "1")  # frozen, not pinned: model.eval() / model.train() reach them
    prefix = cache_frozen_prefix(model)
    x = torch.randn(4, 6)
    for _ in range(3):
        model.train()
        model(x)
        model.eval()
        with torch.no_grad():
            model(x)
    stats = prefix.stats()
    assert (stats.captured_batches, stats.replayed_batches) == (2, 4)


class EarlyOutputs(nn.Module):
    """``early=True`` also returns the stem's output, as ``output_hidden_states=True`` does."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.mid, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, early: bool = False) -> object:
        s = self.stem(x)
        out = self.head(self.mid(s))
        return (out, s) if early else out


def test_a_call_asking_for_early_outputs_is_refused_alone() -> None:
    model = EarlyOutputs()
    tf.freeze(model, "stem", "mid", mode="eval")
    prefix = cache_frozen_prefix(model)
    x = torch.randn(4, 6)
    expected = model.stem(x)
    model(x, early=True)
    with pytest.warns(UserWarning, match="output_hidden_states"):
        _, early = model(x, early=True)
    torch.testing.assert_close(early, expected)
    model(x), model(x)
    assert prefix.stats().replayed_batches == 1 and len(prefix.stats().refused) == 1


def test_a_trainable_parameter_of_a_later_group_feeding_the_prefix_is_refused() -> None:
    model = PosEmbed()
    tf.freeze(model, "embed", "blocks.0", mode="eval")  # pos stays trainable, named with the head
    prefix = cache_frozen_prefix(model, groups=[["embed"], ["blocks.0"], ["blocks.1", "head", "pos"]])
    x = torch.randn(4, 6)
    with pytest.warns(UserWarning, match="trainable parameter feeds"):
        model(x).sum().backward()
    model(x).sum().backward()
    assert prefix.stats().replayed_batches == 0 and model.pos.grad is not None


def test_unfreezing_a_parameter_outside_the_prefix_starts_a_new_store() -> None:
    model = PosEmbed()
    tf.freeze(model, "embed", "pos", "blocks.0", mode="eval")
    prefix = cache_frozen_prefix(model, groups=[["embed"], ["blocks.0"], ["blocks.1", "head", "pos"]])
    x = torch.randn(4, 6)
    model(x), model(x)
    assert prefix.stats().replayed_batches == 1
    tf.unfreeze(model, "pos")
    with pytest.warns(UserWarning, match="trainable parameter feeds"):
        model(x).sum().backward()
    assert model.pos.grad is not None


def test_a_user_hook_on_a_prefix_module_prevents_the_replay() -> None:
    model = blocks()
    tf.freeze(model, "0", "1", mode="eval")
    seen: list[torch.Tensor] = []
    model[0].register_forward_hook(lambda _m, _i, out: seen.append(out))
    prefix = cache_frozen_prefix(model)
    x = torch.randn(4, 6)
    with pytest.warns(UserWarning, match="forward hook"):
        model(x), model(x)
    assert len(seen) == 2 and torch.equal(seen[0], seen[1]) and prefix.stats().replayed_batches == 0


def test_a_buffer_of_a_module_in_no_group_is_watched() -> None:
    class Normalized(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.register_buffer("mean", torch.zeros(6))
            self.body = nn.Linear(6, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x - self.mean))

    model = Normalized()
    tf.freeze(model, "body", mode="eval")
    cache_frozen_prefix(model)
    x = torch.randn(4, 6)
    model(x), model(x)
    model.mean.add_(1.0)
    torch.testing.assert_close(model(x), model.head(model.body(x - model.mean)))


def test_remove_inside_a_replayed_forward_leaves_no_stand_in() -> None:
    model = blocks()
    tf.freeze(model, "0", "1", mode="eval")
    prefix = cache_frozen_prefix(model)
    model[3].register_forward_pre_hook(lambda *_: prefix.remove() if prefix.stats().hits >= 4 else None)
    x = torch.randn(4, 6)
    model(x), model(x), model(x)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(model[0](x), F.gelu(model[0].linear(x)))


def test_an_in_place_change_after_the_boundary_does_not_reach_the_stored_rows() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    tf.freeze(model, "0", mode="eval")
    prefix = cache_frozen_prefix(model, groups=[["0"], ["1"], ["2", "3"]])
    tf.freeze(model, "1", mode="eval")
    x = torch.randn(4, 6)
    expected = model[3](torch.relu(model[1](model[0](x))))
    model(x)
    torch.testing.assert_close(model(x), expected)
    assert prefix.stats().replayed_batches == 1


def test_a_sparse_input_runs_uncached() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    tf.freeze(model, "0", mode="eval")
    prefix = cache_frozen_prefix(model)
    x = torch.randn(4, 6).to_sparse()
    model(x)
    assert prefix.stats().uncached_batches == 1


def test_a_plain_attribute_of_the_root_read_before_the_prefix_is_watched() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.scale = 1.0
            self.body, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x * self.scale))

    model = Scaled()
    tf.freeze(model, "body", mode="eval")
    prefix = cache_frozen_prefix(model)
    x = torch.randn(4, 6)
    model(x), model(x)
    model.scale = 3.0
    torch.testing.assert_close(model(x), model.head(model.body(x * 3.0)))
    assert prefix.stats().replayed_batches == 1
