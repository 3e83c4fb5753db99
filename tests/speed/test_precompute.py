"""precompute_features: the features of a frozen backbone computed once, in memory or in a safetensors file."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, TensorDataset

import torchfreeze as tf
from torchfreeze.errors import ArgumentError, ArgumentTypeError, CacheRefusedError, CheckpointError
from torchfreeze.speed import PrecomputedFeatures, precompute_features

N, DIM, BATCH = 23, 6, 5


class Counting(nn.Module):
    """A frozen MLP with dropout (random in train mode) that counts its forward passes."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(DIM, 8), nn.GELU(), nn.Dropout(0.5), nn.Linear(8, 4))
        self.requires_grad_(False)
        self._calls = 0  # private: a public counter would be a hyperparameter in the fingerprint

    @property
    def calls(self) -> int:
        return self._calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._calls += 1
        out: torch.Tensor = self.body(x)
        return out


class KeywordBackbone(nn.Module):
    """Takes tokenizer-like keywords: ``backbone(**x)`` for a dict x."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4).requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        out: torch.Tensor = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        return out


class WithFeatures(nn.Module):
    """Has ``forward_features`` (the backbone protocol), whose output differs from ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(DIM, 3).requires_grad_(False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).sum(-1)


def inputs(n: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))


def labelled(n: int = N) -> TensorDataset:
    return TensorDataset(inputs(n), torch.arange(n) % 3)


def reference(backbone: nn.Module, x: torch.Tensor, batch_size: int = BATCH) -> torch.Tensor:
    """The careful loop: eval mode, no_grad, the same batches in order."""
    with tf.eval_mode(backbone), torch.no_grad():
        return torch.cat([backbone(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


# --------------------------------------------------------------------------- features and items


def test_features_are_bit_identical_to_a_batched_eval_no_grad_forward() -> None:
    backbone = Counting().train()  # left in train mode: the features are those of backbone.eval()
    ds = precompute_features(backbone, labelled(), batch_size=BATCH)
    assert backbone.calls == -(-N // BATCH)  # once over the data set
    expected = reference(backbone, inputs())
    assert bits(ds.features) == bits(expected)
    for i in range(N):
        feature, target = ds[i]
        assert bits(feature) == bits(expected[i])
        assert torch.equal(target, torch.tensor(i % 3))
    assert len(ds) == N and ds.path is None and not ds.reused


ITEM_FORMS: dict[str, tuple[Callable[[torch.Tensor, int], Any], Callable[[Any, torch.Tensor, int], bool]]] = {
    "bare tensor": (lambda x, i: x, lambda got, f, i: torch.equal(got, f)),
    "tuple with int": (
        lambda x, i: (x, i),
        lambda got, f, i: type(got) is tuple and torch.equal(got[0], f) and type(got[1]) is int and got[1] == i,
    ),
    "list with float and bool": (
        lambda x, i: [x, i / 4, i % 2 == 0],
        lambda got, f, i: type(got) is list and got[1:] == [i / 4, i % 2 == 0] and type(got[2]) is bool,
    ),
    "tuple with nested targets": (
        lambda x, i: (x, {"id": i, "box": torch.full((2,), float(i))}, None, "name"),
        lambda got, f, i: (
            got[1]["id"] == i
            and torch.equal(got[1]["box"], torch.full((2,), float(i)))
            and got[2] is None
            and got[3] == "name"
        ),
    ),
}


@pytest.mark.parametrize("form", list(ITEM_FORMS))
def test_items_keep_their_structure_with_the_feature_in_place_of_x(form: str) -> None:
    make, check = ITEM_FORMS[form]
    backbone = Counting()
    x = inputs()
    ds = precompute_features(backbone, [make(x[i], i) for i in range(N)], batch_size=BATCH)
    expected = reference(backbone, x)
    assert all(check(ds[i], expected[i], i) for i in range(N))
    assert check(ds[-1], expected[-1], N - 1)
    picked = [3, 0, -1, 3]
    assert all(check(item, expected[i], i % N) for i, item in zip(picked, ds.__getitems__(picked), strict=True))


def test_dict_inputs_are_passed_as_keywords() -> None:
    ids = torch.randint(0, 11, (N, 7), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(7) < torch.randint(1, 8, (N, 1), generator=torch.Generator().manual_seed(1))).long()
    data = [({"input_ids": ids[i], "attention_mask": mask[i]}, i) for i in range(N)]
    backbone = KeywordBackbone()
    ds = precompute_features(backbone, data, batch_size=4)
    with torch.no_grad():
        expected = torch.cat(
            [backbone(input_ids=ids[i : i + 4], attention_mask=mask[i : i + 4]) for i in range(0, N, 4)]
        )
    assert bits(ds.features) == bits(expected)
    assert [ds[i][1] for i in range(N)] == list(range(N))


def test_forward_features_is_used_when_the_backbone_has_it_unless_method_forward() -> None:
    backbone, x = WithFeatures(), inputs()
    auto = precompute_features(backbone, list(x), batch_size=BATCH)
    plain = precompute_features(backbone, list(x), batch_size=BATCH, method="forward")
    with torch.no_grad():
        assert torch.equal(auto.features, torch.cat([backbone.lin(x[i : i + BATCH]) for i in range(0, N, BATCH)]))
        assert plain.features.shape == (N,) and torch.equal(plain.features, reference(backbone, x))  # sums


def test_a_structured_output_is_stored_per_leaf() -> None:
    class Two(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, Any]:
            return {"mean": x.mean(1), "pair": (x[:, :2], x.argmax(1))}

    x = inputs()
    ds = precompute_features(Two(), list(x), batch_size=BATCH)
    assert torch.equal(ds.features["pair"][1], x.argmax(1)) and ds.features["pair"][1].dtype == torch.int64
    assert torch.equal(ds[3]["pair"][0], x[3, :2]) and torch.equal(ds[3]["mean"], x[3].mean())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_storage_halves_the_memory_and_gives_the_features_in_that_dtype(dtype: torch.dtype) -> None:
    backbone = Counting()
    full = precompute_features(backbone, labelled(), batch_size=BATCH)
    half = precompute_features(backbone, labelled(), batch_size=BATCH, dtype=dtype)
    assert half.features.dtype == dtype and half.nbytes * 2 == full.nbytes
    assert bits(half.features) == bits(full.features.to(dtype))


# --------------------------------------------------------------------------- batches and training


def test_batches_equal_a_dataloader_in_order_and_follow_random_sampler_when_shuffled() -> None:
    ds = precompute_features(Counting(), labelled(), batch_size=BATCH)
    for kwargs in ({}, {"drop_last": True}):
        loader = list(DataLoader(ds, batch_size=4, **kwargs))
        mine = list(ds.batches(4, **kwargs))
        assert len(mine) == len(loader)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(mine, loader, strict=True))
    order = list(RandomSampler(ds, generator=torch.Generator().manual_seed(3)))
    mine = list(ds.batches(4, shuffle=True, generator=torch.Generator().manual_seed(3)))
    assert torch.cat([b[1] for b in mine]).tolist() == [ds[i][1].item() for i in order]
    assert torch.equal(torch.cat([b[0] for b in mine]), ds.features[order])


def _train_head(batches: Callable[[int], Any], epochs: int = 3) -> torch.Tensor:
    torch.manual_seed(0)
    head = nn.Linear(4, 3)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(epochs):
        for features, target in batches(epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(head(features), target).backward()
            opt.step()
    return torch.cat([p.detach().flatten() for p in head.parameters()])


def test_a_linear_head_trained_on_precomputed_features_is_bit_identical_to_computing_them_each_step() -> None:
    backbone, data = Counting(), labelled()
    x, y = data.tensors

    def computed(epoch: int) -> Any:  # the careful loop: the backbone in eval under no_grad at every step
        for i in range(0, N, BATCH):
            with tf.eval_mode(backbone), torch.no_grad():
                features = backbone(x[i : i + BATCH])
            yield features, y[i : i + BATCH]

    ds = precompute_features(backbone, data, batch_size=BATCH)
    direct = _train_head(computed)
    assert bits(direct) == bits(_train_head(lambda e: ds.batches(BATCH)))
    assert bits(direct) == bits(_train_head(lambda e: DataLoader(ds, batch_size=BATCH)))
    assert not torch.equal(direct, _train_head(lambda e: []))  # the head did train


# --------------------------------------------------------------------------- directory


def test_a_second_call_maps_the_file_and_does_not_run_the_backbone(tmp_path: Path) -> None:
    backbone = Counting()
    first = precompute_features(backbone, labelled(), batch_size=BATCH, directory=tmp_path / "feats")
    calls = backbone.calls
    second = precompute_features(backbone, labelled(), batch_size=BATCH, directory=tmp_path / "feats")
    assert backbone.calls == calls and second.reused and not first.reused and second.path == first.path
    assert bits(second.features) == bits(first.features) == bits(reference(backbone, inputs()))
    assert bits(second.features) == bits(precompute_features(backbone, labelled(), batch_size=BATCH).features)
    assert [second[i][1] for i in range(N)] == [first[i][1] for i in range(N)]
    assert [p.name for p in (tmp_path / "feats").iterdir()] == [first.path.name]  # no temporary file left
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(str(second.path), "pt") as f:  # a plain safetensors file
        assert torch.equal(f.get_tensor("feature.0"), first.features)
        assert f.metadata()["format"] == "torchfreeze.precompute/1"
    second.features.mul_(0)  # the map is private: the file keeps its data
    assert precompute_features(backbone, labelled(), batch_size=BATCH, directory=tmp_path / "feats").reused


def test_half_storage_round_trips_through_the_file(tmp_path: Path) -> None:
    backbone = Counting()
    first = precompute_features(backbone, labelled(), batch_size=BATCH, dtype=torch.bfloat16, directory=tmp_path)
    second = precompute_features(backbone, labelled(), batch_size=BATCH, dtype=torch.bfloat16, directory=tmp_path)
    assert second.reused and second.features.dtype == torch.bfloat16
    assert bits(second.features) == bits(first.features) == bits(reference(backbone, inputs()).to(torch.bfloat16))


OTHER_SETTINGS: dict[str, Callable[[Counting], dict[str, Any]]] = {
    "batch size": lambda b: {"batch_size": BATCH + 1},
    "dtype": lambda b: {"dtype": torch.bfloat16},
    "salt": lambda b: {"salt": "preprocessing-v2"},
    "weights": lambda b: {"backbone": Counting(seed=7)},
    "data of the same length": lambda b: {"dataset": TensorDataset(inputs(seed=9), torch.zeros(N, dtype=torch.long))},
}


@pytest.mark.parametrize("change", list(OTHER_SETTINGS))
def test_other_settings_or_data_are_computed_again(tmp_path: Path, change: str) -> None:
    backbone = Counting()
    precompute_features(backbone, labelled(), batch_size=BATCH, directory=tmp_path)
    kwargs: dict[str, Any] = {"backbone": backbone, "dataset": labelled(), "batch_size": BATCH, "directory": tmp_path}
    kwargs.update(OTHER_SETTINGS[change](backbone))
    again = precompute_features(**kwargs)
    assert not again.reused and len(list(tmp_path.iterdir())) == 2


def _flip_data_byte(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0x10
    p.write_bytes(bytes(raw))


def _edit_header(p: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    p.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


DAMAGES: dict[str, Callable[[Path], None]] = {
    "a flipped data byte": _flip_data_byte,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-4]),
    "extended": lambda p: p.write_bytes(p.read_bytes() + b"\0" * 8),
    "header only": lambda p: p.write_bytes(p.read_bytes()[:16]),
    "empty": lambda p: p.write_bytes(b""),
    "huge header length": lambda p: p.write_bytes((1 << 62).to_bytes(8, "little") + p.read_bytes()[8:]),
    "not JSON": lambda p: p.write_bytes(p.read_bytes()[:8] + b"\xff" * (len(p.read_bytes()) - 8)),
    "foreign key": lambda p: _edit_header(p, lambda h: h["__metadata__"].update(key="0" * 64)),
    "another format": lambda p: _edit_header(p, lambda h: h["__metadata__"].update(format="other/1")),
    "wrong length": lambda p: _edit_header(p, lambda h: h["__metadata__"].update(length="3")),
    "bad spec": lambda p: _edit_header(p, lambda h: h["__metadata__"].update(output_spec='[1, {"type": "os.system"}]')),
    "object targets": lambda p: _edit_header(p, lambda h: h["__metadata__"].update(rest_kinds='["object"]')),
    "shape lies": lambda p: _edit_header(p, lambda h: h["feature.0"].update(shape=[N, 2, 2])),
    "overlapping offsets": lambda p: _edit_header(p, lambda h: h["feature.0"].update(data_offsets=[0, N * 16])),
    "a symbolic link": lambda p: (p.rename(p.with_suffix(".real")), p.symlink_to(p.with_suffix(".real"))),
    "a directory": lambda p: (p.unlink(), p.mkdir()),
    "a safetensors file of other tensors": lambda p: _edit_header(p, lambda h: h.pop("rest.0")),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_truncated_or_foreign_file_is_computed_again_never_used(tmp_path: Path, damage: str) -> None:
    backbone = Counting()
    first = precompute_features(backbone, labelled(), batch_size=BATCH, directory=tmp_path)
    assert first.path is not None
    path = first.path
    del first
    DAMAGES[damage](path)
    calls = backbone.calls
    if damage == "a directory":
        with pytest.raises(CheckpointError, match=r"directory"):  # the path is taken by a directory: not written
            precompute_features(backbone, labelled(), batch_size=BATCH, directory=tmp_path)
        return
    again = precompute_features(backbone, labelled(), batch_size=BATCH, directory=tmp_path)
    assert not again.reused and backbone.calls > calls
    assert bits(again.features) == bits(reference(backbone, inputs()))
    assert precompute_features(backbone, labelled(), batch_size=BATCH, directory=tmp_path).reused  # rewritten


def test_a_new_directory_is_created_and_removed_again_if_the_run_fails(tmp_path: Path) -> None:
    class Broken(Dataset[Any]):
        def __len__(self) -> int:
            return N

        def __getitem__(self, i: int) -> Any:
            if i == N - 2 and self.armed:
                raise FileNotFoundError(errno.ENOENT, "image missing", f"img{i}.png")
            return inputs()[i]

        armed = False

    data = Broken()
    data.armed = True
    target = tmp_path / "a" / "b"
    with pytest.raises(FileNotFoundError, match="image missing"):  # the data set's own error, unchanged
        precompute_features(Counting(), data, batch_size=BATCH, directory=target, verify=0)
    assert list(tmp_path.iterdir()) == []


def test_targets_a_file_cannot_hold_are_refused_with_directory_and_nothing_is_left(tmp_path: Path) -> None:
    data = [(x, f"name{i}") for i, x in enumerate(inputs())]
    assert precompute_features(Counting(), data, batch_size=BATCH)[4][1] == "name4"  # memory: kept as they are
    with pytest.raises(ArgumentError, match=r"directory=.*Fix"):
        precompute_features(Counting(), data, batch_size=BATCH, directory=tmp_path / "d")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- refusals


class Augmented(Dataset[Any]):
    def __init__(self) -> None:
        self.x = inputs()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> Any:
        x = self.x[i] + 0.01 * torch.randn(DIM)  # noise augmentation: every read differs
        return x, 0


def test_a_random_data_set_is_refused_before_the_backbone_runs(tmp_path: Path) -> None:
    backbone = Counting()
    with pytest.raises(CacheRefusedError, match=r"random.*augmentation.*Fix.*cache_features"):
        precompute_features(backbone, Augmented(), directory=tmp_path / "d")
    assert backbone.calls == 0 and list(tmp_path.iterdir()) == []
    assert len(precompute_features(backbone, Augmented(), verify=0)) == N  # verify=0: the user's choice


REFUSED: dict[str, Callable[[], nn.Module]] = {
    "a trainable parameter": lambda: Counting().requires_grad_(True),
    "dropout pinned in train mode": lambda: tf.pin_mode(Counting(), "body.2", mode="train"),
    "BatchNorm pinned in train mode": lambda: tf.pin_mode(
        nn.Sequential(nn.BatchNorm1d(DIM)).requires_grad_(False), mode="train"
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_trainable_or_random_backbone_is_refused_and_left_as_it_was(case: str) -> None:
    backbone = REFUSED[case]()
    flags = [m.training for m in backbone.modules()]
    grads = [p.requires_grad for p in backbone.parameters()]
    with pytest.raises(CacheRefusedError, match=r"precompute_features\(backbone=.*Fix"):
        precompute_features(backbone, labelled())
    assert [m.training for m in backbone.modules()] == flags and [
        p.requires_grad for p in backbone.parameters()
    ] == grads


def test_the_backbones_train_eval_flags_are_restored_exactly() -> None:
    backbone = Counting()
    backbone.train()
    backbone.body[0].eval()
    flags = [m.training for m in backbone.modules()]
    precompute_features(backbone, labelled(), batch_size=BATCH)
    assert [m.training for m in backbone.modules()] == flags

    class Fails(Counting):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.calls == 2:
                raise RuntimeError("out of memory (simulated)")
            return super().forward(x)

    failing = Fails().train()
    with pytest.raises(RuntimeError, match="simulated"):
        precompute_features(failing, labelled(), batch_size=BATCH)
    assert all(m.training for m in failing.modules())


# --------------------------------------------------------------------------- bad input


class NoLength(Dataset[Any]):
    def __getitem__(self, i: int) -> Any:
        return torch.zeros(DIM)


class Stream(IterableDataset[Any]):
    def __iter__(self) -> Any:
        return iter([torch.zeros(DIM)])


def _call(**kwargs: Any) -> Callable[[Path], Any]:
    def call(tmp: Path) -> Any:
        args: dict[str, Any] = {"backbone": Counting(), "dataset": labelled(), **kwargs}
        if str(args.get("directory", "")).startswith("FILE"):  # a regular file where a directory goes
            (tmp / "file").write_text("x")
            args["directory"] = tmp / str(args["directory"]).replace("FILE", "file")
        return precompute_features(**args)

    return call


BAD_INPUT: dict[str, tuple[Callable[[Path], Any], type[Exception], str]] = {
    "backbone a list": (_call(backbone=[nn.Linear(2, 2)]), ArgumentTypeError, "backbone="),
    "dataset an int": (_call(dataset=5), ArgumentTypeError, "dataset="),
    "dataset iterable": (_call(dataset=Stream()), ArgumentTypeError, "dataset="),
    "dataset without length": (_call(dataset=NoLength()), ArgumentTypeError, "dataset="),
    "dataset a string": (_call(dataset="images/"), ArgumentTypeError, "dataset="),
    "dataset empty": (_call(dataset=[]), ArgumentError, "dataset="),
    "item an empty tuple": (_call(dataset=[()]), ArgumentError, "dataset="),
    "batch_size 0": (_call(batch_size=0), ArgumentError, "batch_size="),
    "batch_size a str": (_call(batch_size="64"), ArgumentTypeError, "batch_size="),
    "batch_size True": (_call(batch_size=True), ArgumentTypeError, "batch_size="),
    "dtype a str": (_call(dtype="bfloat16"), ArgumentTypeError, "dtype="),
    "dtype an int dtype": (_call(dtype=torch.int64), ArgumentError, "dtype="),
    "directory a file": (_call(directory="FILE"), ArgumentError, "directory="),
    "directory under a file": (_call(directory="FILE/features"), CheckpointError, "directory="),
    "directory bytes": (_call(directory=b"cache"), ArgumentTypeError, "directory="),
    "directory empty": (_call(directory=""), ArgumentError, "directory="),
    "verify negative": (_call(verify=-1), ArgumentError, "verify="),
    "verify a float": (_call(verify=1.5), ArgumentTypeError, "verify="),
    "device a number": (_call(device=5), ArgumentTypeError, "device="),
    "device unknown": (_call(device="gpu0"), ArgumentError, "device="),
    "collate_fn not callable": (_call(collate_fn=3), ArgumentTypeError, "collate_fn="),
    "num_workers negative": (_call(num_workers=-1), ArgumentError, "num_workers="),
    "method unknown": (_call(method="features"), ArgumentError, "method="),
    "method forward_features missing": (_call(method="forward_features"), ArgumentError, "method="),
    "salt bytes": (_call(salt=b"v2"), ArgumentTypeError, "salt="),
    "outputs of varying shape": (
        _call(backbone=nn.Flatten(0), dataset=list(inputs()), batch_size=4),
        ArgumentError,
        "backbone=",
    ),
    "targets of varying type": (
        _call(dataset=[(x, i if i else "zero") for i, x in enumerate(inputs())]),
        ArgumentError,
        "dataset=",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_names_the_argument_and_the_fix(tmp_path: Path, case: str) -> None:
    call, error, argument = BAD_INPUT[case]
    with pytest.raises(error) as info:
        call(tmp_path)
    message = str(info.value)
    assert message.startswith("precompute_features(") and argument in message and "Fix" in message
    assert len(message) < 600


def test_indexing_and_batches_check_their_arguments() -> None:
    ds = precompute_features(Counting(), labelled(), batch_size=BATCH)
    assert isinstance(ds, PrecomputedFeatures) and "n=23" in repr(ds)
    with pytest.raises(IndexError):
        ds[N]
    with pytest.raises(ArgumentTypeError, match="Fix"):
        ds["3"]
    with pytest.raises(ArgumentError, match="batch_size"):
        next(ds.batches(0))
    with pytest.raises(ArgumentTypeError, match="generator"):
        next(ds.batches(2, shuffle=True, generator=3))  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_features_kept_on_the_gpu(tmp_path: Path) -> None:
    backbone = Counting().cuda()
    x = inputs()
    ds = precompute_features(backbone, labelled(), batch_size=BATCH, device="cuda")
    assert ds.features.is_cuda and bits(ds.features.cpu()) == bits(reference(backbone, x.cuda()).cpu())
    on_disk = precompute_features(backbone, labelled(), batch_size=BATCH, device="cuda", directory=tmp_path)
    again = precompute_features(backbone, labelled(), batch_size=BATCH, device="cuda", directory=tmp_path)
    assert again.reused and again.features.is_cuda and torch.equal(again.features, on_disk.features)
    assert all(f.is_cuda and not y.is_cuda for f, y in again.batches(4))


@pytest.mark.slow
def test_worker_processes_read_the_items() -> None:
    ds = precompute_features(Counting(), labelled(), batch_size=BATCH, num_workers=1)
    assert bits(ds.features) == bits(precompute_features(Counting(), labelled(), batch_size=BATCH).features)


@pytest.mark.parametrize("tensors", [1, 2, 3])
def test_a_tensor_data_set_sliced_directly_gives_what_its_items_give(tensors: int) -> None:
    x = inputs()
    data = TensorDataset(x, *[torch.arange(N) * k for k in range(1, tensors)])
    fast = precompute_features(Counting(), data, batch_size=BATCH)  # sliced
    items = precompute_features(Counting(), [data[i] for i in range(N)], batch_size=BATCH)  # item by item
    assert bits(fast.features) == bits(items.features)
    for i in range(N):
        a, b = fast[i], items[i]
        assert type(a) is type(b) is tuple and len(a) == len(b) == tensors
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_a_hugging_face_encoder_over_tokenizer_output_and_a_composites_backbone() -> None:
    transformers = pytest.importorskip("transformers")
    from torchfreeze.compose import HFEncoder

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8,
        max_position_embeddings=16,
    )  # fmt: skip
    model = tf.Composite(HFEncoder(transformers.BertModel(config)), nn.Linear(8, 2))
    tf.freeze(model, "backbone")  # left in train mode: its dropout is off during the run
    ids = torch.randint(1, 30, (N, 9), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(9) < torch.randint(2, 10, (N, 1), generator=torch.Generator().manual_seed(1))).long()
    data = [({"input_ids": ids[i], "attention_mask": mask[i]}, i % 2) for i in range(N)]
    ds = precompute_features(model.backbone, data, batch_size=4)
    with tf.eval_mode(model), torch.no_grad():
        batches = [{"input_ids": ids[i : i + 4], "attention_mask": mask[i : i + 4]} for i in range(0, N, 4)]
        expected = torch.cat([model.backbone.forward_features(b) for b in batches])
    assert bits(ds.features) == bits(expected) and ds.features.shape == (N, 8)
    assert model.backbone.training  # the flags are restored
    with pytest.raises(CacheRefusedError, match=r"head\.weight.*model\.backbone"):  # the whole model trains its head
        precompute_features(model, data)
