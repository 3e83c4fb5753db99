"""Default layer groups from the model's structure: stem, one group per block, then what follows.

The rule (documented in ``docs/real-models.md``):

* A model that defines ``layer_groups(self)`` decides for itself.
* **Blocks.** A *block container* is a ``ModuleList``/``Sequential`` whose items
  with parameters are all composite modules (modules with children) and that
  either holds at least two of them or holds a *block class*: a composite class
  that is an item of such containers at least twice in the model, or that the
  model names in Hugging Face's ``_no_split_modules``. Each item of the
  outermost block containers is one group (BERT's ``encoder.layer.<i>``,
  GPT-2's ``transformer.h.<i>``, Wav2Vec2's ``feature_extractor.conv_layers.<i>``
  *and* ``encoder.layers.<i>``, a ResNet's residual blocks).
* **Everything else** between blocks is merged into one group: the embeddings
  or stem before the first block, whatever lies between two block sequences,
  and the final norm, pooler and head after the last one.
* **No blocks** (a plain ``Sequential`` of layers): descend through modules
  with a single child holding parameters; then each child with parameters is a
  group (a ``ModuleList``/``Sequential`` child gives one group per item), and a
  normalisation layer stays with the Conv/Linear layer right before it.
* **Tied parameters** belong to the group of their first use, and their module
  moves there: GPT-2's ``lm_head`` (tied to ``transformer.wte``) is in the
  embeddings group, so it unfreezes with the embeddings, and gradual
  unfreezing never splits a tie.
"""

from __future__ import annotations

from torch import nn

from torchfreeze._core.checks import require_module
from torchfreeze._core.select import resolve
from torchfreeze._core.wrappers import unwrap
from torchfreeze.nn.batchnorm import is_norm

__all__ = ["layer_groups"]

_CONTAINERS = (nn.ModuleList, nn.Sequential)
_NORM_HOSTS = (nn.modules.conv._ConvNd, nn.Linear)


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _items(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, c) for n, c in module.named_children() if _has_parameters(c)]


def _composite(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _Structure:
    """Which classes are blocks and which containers hold them, for one model."""

    def __init__(self, model: nn.Module) -> None:
        counts: dict[type, int] = {}
        for module in model.modules():
            if isinstance(module, _CONTAINERS):
                for _, item in _items(module):
                    if _composite(item):
                        counts[type(item)] = counts.get(type(item), 0) + 1
        no_split = getattr(model, "_no_split_modules", None) or ()
        named = {str(n) for n in no_split} if isinstance(no_split, (list, tuple, set)) else set()
        self.block_classes = {t for t, c in counts.items() if c >= 2 or t.__name__ in named}
        self._holds: dict[int, bool] = {}

    def is_block_container(self, module: nn.Module) -> bool:
        if not isinstance(module, _CONTAINERS):
            return False
        items = [c for _, c in _items(module)]
        if not items or not all(_composite(c) for c in items):
            return False
        return len(items) >= 2 or any(type(c) in self.block_classes for c in items)

    def holds_blocks(self, module: nn.Module) -> bool:
        """True when ``module`` is or contains a block container."""
        key = id(module)
        if key not in self._holds:
            self._holds[key] = self.is_block_container(module) or any(self.holds_blocks(c) for _, c in _items(module))
        return self._holds[key]


def _units(structure: _Structure, prefix: str, module: nn.Module) -> list[tuple[bool, list[str]]]:
    """``(is_block, names)`` in model order: blocks, and the maximal parts with no block inside."""
    if structure.is_block_container(module):
        return [(True, [_join(prefix, n)]) for n, _ in _items(module)]
    out: list[tuple[bool, list[str]]] = []
    direct = [_join(prefix, n) for n, _ in module.named_parameters(recurse=False)]
    if direct:
        out.append((False, direct))
    for name, child in _items(module):
        path = _join(prefix, name)
        if structure.holds_blocks(child):
            out.extend(_units(structure, path, child))
        else:
            out.append((False, [path]))
    return out


def _with_norms(model: nn.Module, names: list[str]) -> list[list[str]]:
    """One group per name, a normalisation layer joining the Conv/Linear right before it."""
    groups: list[list[str]] = []
    previous: nn.Module | None = None
    for name in names:
        module = model.get_submodule(name)
        if groups and isinstance(previous, _NORM_HOSTS) and is_norm(module):
            groups[-1].append(name)
        else:
            groups.append([name])
        previous = module
    return groups


def _plain_groups(model: nn.Module) -> list[list[str]]:
    """Groups of a model without blocks (the 0.1 rule, norms kept with their layer)."""
    prefix, module = "", model
    while True:
        direct = [n for n, _ in module.named_parameters(recurse=False)]
        items = _items(module)
        if not direct and len(items) == 1 and not isinstance(module, _CONTAINERS):
            name, module = items[0]
            prefix = _join(prefix, name)
            continue
        break
    groups: list[list[str]] = [[_join(prefix, n) for n in direct]] if direct else []
    names: list[str] = []
    for name, child in items:
        names.extend(_expand(_join(prefix, name), child))
    return groups + _with_norms(model, names)


def _expand(prefix: str, module: nn.Module) -> list[str]:
    """The items of a ModuleList/Sequential (or of one that ``module`` only wraps), else ``module``."""
    if isinstance(module, _CONTAINERS):
        return [_join(prefix, n) for n, _ in _items(module)]
    items = _items(module)
    if len(items) == 1 and not list(module.parameters(recurse=False)):
        name, child = items[0]
        if isinstance(child, _CONTAINERS):
            return _expand(_join(prefix, name), child)
    return [prefix]


def _block_groups(model: nn.Module, structure: _Structure) -> list[list[str]]:
    groups: list[list[str]] = []
    merging = False
    for is_block, names in _units(structure, "", model):
        if is_block or not merging:
            groups.append(list(names))
        else:
            groups[-1].extend(names)
        merging = not is_block
    return groups


def _move_ties(model: nn.Module, groups: list[list[str]]) -> list[list[str]]:
    """Each parameter stays in the group of its first use; a module whose parameters all belong
    to one earlier group moves there whole, otherwise its tied parameters move one by one."""
    home: dict[int, int] = {}
    members: list[list[tuple[str, list[nn.Parameter]]]] = []
    for index, group in enumerate(groups):
        row = []
        for name in group:
            params = list(resolve(model, name).parameters.values())
            for p in params:
                home.setdefault(id(p), index)
            row.append((name, params))
        members.append(row)
    out: list[list[str]] = [[] for _ in groups]
    for index, row in enumerate(members):
        for name, params in row:
            homes = {home[id(p)] for p in params}
            if homes == {index} or not params:
                out[index].append(name)
            elif len(homes) == 1:
                out[homes.pop()].append(name)
            else:
                for pname, p in resolve(model, name).parameters.items():
                    out[home[id(p)]].append(pname)
    return [list(dict.fromkeys(g)) for g in out if g]


def layer_groups(model: nn.Module) -> list[list[str]]:
    """The model's layer groups, input side first, each a list of qualified names.

    A model that defines a method ``layer_groups(self)`` returning a list of
    selectors decides for itself. Otherwise the groups follow the model's
    blocks: the stem/embeddings, one group per block of each repeated block
    sequence, then what follows (final norm, pooler, head) as one group; a
    model without blocks gets one group per layer, a norm kept with the
    Conv/Linear before it. A tied parameter belongs to the group of its first
    use (GPT-2's ``lm_head`` is in the embeddings group). The full rule is in
    this module's docstring and ``docs/real-models.md``.

    Args:
        model: any ``nn.Module``.

    Returns:
        The groups, each a list of qualified names (``[]`` for a model without parameters).

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module``.
        SelectorError: a selector from the model's own ``layer_groups()`` matched nothing.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> layer_groups(model)
        [['0'], ['2']]
        >>> block = lambda: nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
        >>> net = nn.Sequential(nn.Conv1d(1, 2, 1), nn.BatchNorm1d(2), nn.ModuleList([block(), block()]))
        >>> layer_groups(net)
        [['0', '1'], ['2.0'], ['2.1']]
    """
    require_module(model, "layer_groups")
    model = unwrap(model)  # canonical names under DDP / torch.compile wrappers
    # a method of the model's class (not a submodule named layer_groups, nor what Frozen forwards)
    custom = getattr(type(model), "layer_groups", None)
    if callable(custom):
        return [resolve(model, selector).matched for selector in custom(model)]
    structure = _Structure(model)
    if not structure.holds_blocks(model):
        return _move_ties(model, _plain_groups(model))
    return _move_ties(model, _block_groups(model, structure))
