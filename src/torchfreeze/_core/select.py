"""Selection: the one place where a selector is turned into modules and parameters.

Every public verb resolves its selectors through :func:`resolve`. The name space
is the qualified names of the model's modules *and* parameters, over every path
(a shared module or parameter has several names). A module's name selects its
whole subtree.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from torchfreeze._core.checks import _REPR_LIMIT, bind_problem, require_module, short_repr
from torchfreeze._core.glob import glob_to_regex
from torchfreeze._core.wrappers import unwrap
from torchfreeze.errors import SelectorError, SelectorTypeError

__all__ = ["Selector", "Selection", "resolve", "select", "parameter_paths", "glob_to_regex"]

Selector = Union[
    str,
    "re.Pattern[str]",
    type,
    tuple[type, ...],
    Callable[[str, nn.Module], bool],
    nn.Module,
    Sequence[Any],
]

_GLOB_CHARS = set("*?[")


@dataclass
class Selection:
    """What a list of selectors names in one model (private result of :func:`resolve`).

    ``matched`` holds the names the selectors matched directly; ``modules`` and
    ``parameters`` hold every module and parameter path in the selected subtrees,
    in model order.
    """

    matched: list[str] = field(default_factory=list)
    modules: dict[str, nn.Module] = field(default_factory=dict)
    parameters: dict[str, nn.Parameter] = field(default_factory=dict)

    def unique_parameters(self) -> dict[int, nn.Parameter]:
        """The selected parameters once each, keyed by ``id``."""
        return {id(p): p for p in self.parameters.values()}

    def unique_modules(self) -> dict[int, nn.Module]:
        """The selected modules once each, keyed by ``id``."""
        return {id(m): m for m in self.modules.values()}


def _module_paths(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(model.named_modules(remove_duplicate=False))


def _parameter_items(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(model.named_parameters(remove_duplicate=False))


def parameter_paths(model: nn.Module) -> dict[int, list[str]]:
    """Map ``id(parameter)`` to every qualified name under which it is reachable.

    Sharing is read from the module tree, never by comparing values.

    Args:
        model: any ``nn.Module``.

    Returns:
        ``{id(parameter): [path, ...]}``, paths in model order.

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(2, 2)
        >>> paths = parameter_paths(nn.Sequential(lin, lin))
        >>> paths[id(lin.weight)]
        ['0.weight', '1.weight']
    """
    paths: dict[int, list[str]] = {}
    for name, param in _parameter_items(unwrap(model)):
        paths.setdefault(id(param), []).append(name)
    return paths


def _describe(selector: Any) -> str:
    """A bounded description of a selector for messages (about 80 characters at most, never a tensor's values)."""
    if isinstance(selector, re.Pattern):
        return "re.compile(" + short_repr(selector.pattern, _REPR_LIMIT - 12) + ")"
    if selector is None or isinstance(selector, (str, int, float, list, tuple)):
        return short_repr(selector)
    if isinstance(selector, torch.Tensor):
        kind = "Parameter" if isinstance(selector, nn.Parameter) else "tensor"
        return f"<{kind} of shape {tuple(selector.shape)}>"
    if isinstance(selector, type):
        text = selector.__name__
    elif callable(selector) and not isinstance(selector, nn.Module) and hasattr(selector, "__qualname__"):
        text = f"<function {selector.__qualname__}>"
    else:  # a module, an optimizer...: their reprs can be huge
        text = f"<{type(selector).__name__} object>"
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


def _head(verb: str | None, argument: str, selector: Any) -> str:
    """How a message names the selector: ``"freeze(selectors=<it>): the selector"`` when the verb is known,
    else ``"selector <it>"``."""
    if verb is None:
        return f"selector {_describe(selector)}"
    return f"{verb}({argument}={_describe(selector)}): the selector"


def _tensor_hint(selector: Any, param_items: list[tuple[str, nn.Parameter]]) -> str:
    """For a tensor selector: its names in the model as the selector to pass, else the general fix."""
    names = [n for n, p in param_items if p is selector]
    if names:
        shown = " or ".join(repr(n) for n in names[:3])
        return f"Fix: select a parameter by its name: pass {shown}."
    return (
        "This tensor is not a parameter of the model. Fix: pass the qualified name of the parameter to "
        "select (see model.named_parameters())."
    )


def _closest(target: str, names: Iterable[str], count: int = 5) -> list[str]:
    names = [n for n in names if n]
    close = difflib.get_close_matches(target, names, n=count, cutoff=0.4)
    if close:
        return close
    return names[:count]


def _suggestions(
    target: str, module_paths: list[tuple[str, nn.Module]], param_items: list[tuple[str, nn.Parameter]]
) -> list[str]:
    """Selectors that match, closest to ``target`` first: ``'**.<target>'`` when that glob matches
    (the name is deeper in the model), then the closest qualified names (each matches itself)."""
    names = [n for n, _ in module_paths if n] + [n for n, _ in param_items]
    out: list[str] = []
    if target and not target.startswith("**"):
        deeper = f"**.{target}"
        try:
            if _match_one(deeper, module_paths, param_items, "selector"):
                out.append(deeper)
        except SelectorError:  # target is not a valid glob: no glob suggestion
            pass
    for name in _closest(target, names):
        if name not in out and _match_one(name, module_paths, param_items, "selector"):
            out.append(name)
    return out


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _no_match(
    selector: Any,
    module_paths: list[tuple[str, nn.Module]],
    param_items: list[tuple[str, nn.Parameter]],
    head: str,
) -> SelectorError:
    if isinstance(selector, str):
        for wrapper in _WRAPPER_PREFIXES:  # a name seen on a DDP / torch.compile wrapper
            inner = selector[len(wrapper) :]
            if selector.startswith(wrapper) and inner and _match_one(inner, module_paths, param_items, head):
                return SelectorError(
                    f"{head} matched no module or parameter of the model: names are canonical, those of the "
                    f"model inside DDP / DataParallel / torch.compile, without the wrapper's {wrapper!r}. "
                    f"Fix: pass {short_repr(inner)}."
                )
    if isinstance(selector, str):
        target = selector
    elif isinstance(selector, re.Pattern):
        target = selector.pattern
    else:
        target = _describe(selector)
    suggestions = ", ".join(short_repr(n) for n in _suggestions(target[:200], module_paths, param_items))
    return SelectorError(
        f"{head} matched no module or parameter of the model. "
        + (f"Fix: use one of these selectors, which match: {suggestions}; " if suggestions else "Fix: ")
        + "call torchfreeze.select(model, ...) to see what a selector matches."
    )


def _match_one(
    selector: Any,
    module_paths: list[tuple[str, nn.Module]],
    param_items: list[tuple[str, nn.Parameter]],
    head: str,
) -> list[str]:
    """Return the qualified names (modules and parameters) one selector matches (``head`` names it in errors)."""
    if isinstance(selector, str):
        if not selector:
            raise SelectorError(
                f"{head} (an empty string) names nothing; expected a dotted name or glob such as "
                "'encoder' or '**.bias'. Fix: pass no selector at all to mean the whole model."
            )
        exact = [n for n, _ in module_paths if n == selector] + [n for n, _ in param_items if n == selector]
        if exact or not _GLOB_CHARS & set(selector):  # a real name wins, even one like "a[1]"
            return exact
        try:
            regex = re.compile(glob_to_regex(selector))
        except re.error as error:
            raise SelectorError(
                f"{head} is not a valid glob ({error}); expected '*' within a segment, "
                "'**' for any segments, '?' or a character class such as '[0-3]'. "
                "Fix: correct the pattern, or pass a compiled regex."
            ) from None
        return [n for n, _ in module_paths if n and regex.fullmatch(n)] + [
            n for n, _ in param_items if regex.fullmatch(n)
        ]
    if isinstance(selector, re.Pattern):
        return [n for n, _ in module_paths if n and selector.fullmatch(n)] + [
            n for n, _ in param_items if selector.fullmatch(n)
        ]
    if isinstance(selector, type):
        if not issubclass(selector, nn.Module):
            raise SelectorTypeError(
                f"{head} (a type) is not an nn.Module subclass; "
                "expected a module type such as nn.BatchNorm2d. Fix: pass a module class or a tuple of them."
            )
        return [n for n, m in module_paths if isinstance(m, selector)]
    if isinstance(selector, tuple) and selector and all(isinstance(t, type) for t in selector):
        for t in selector:
            if not issubclass(t, nn.Module):
                raise SelectorTypeError(
                    f"{head} (a tuple of types) contains {short_repr(t.__name__)}, which is not an nn.Module subclass; expected "
                    "module classes only, e.g. (nn.BatchNorm1d, nn.BatchNorm2d). Fix: put other selectors "
                    "in a list instead."
                )
        return [n for n, m in module_paths if isinstance(m, selector)]
    if isinstance(selector, nn.Module):
        return [n for n, m in module_paths if m is selector]
    if callable(selector):
        if bind_problem(selector, "name", module_paths[0][1]) is not None:
            raise SelectorTypeError(
                f"{head} (a predicate) cannot be called as predicate(name, module); expected a function "
                "of two arguments returning a bool. Fix: e.g. lambda name, module: name.startswith('encoder')."
            )
        matched = []
        for name, module in module_paths:
            result = selector(name, module)
            if not isinstance(result, bool):
                raise SelectorTypeError(
                    f"{head} (a predicate) returned {type(result).__name__} for "
                    f"{short_repr(name)}; expected a bool from (name, module) -> bool. Fix: return True or False."
                )
            if result:
                matched.append(name)
        return matched
    if isinstance(selector, torch.Tensor):  # a common slip: suggest the parameter's name
        raise SelectorTypeError(f"{head} is a tensor, not a selector. " + _tensor_hint(selector, param_items))
    raise SelectorTypeError(
        f"{head} of type {type(selector).__name__} is not understood; expected a dotted "
        "name or glob (str), a compiled regex, a module type or tuple of types, a predicate "
        "(name, module) -> bool, a module object in the model, or a list of these. Fix: pass one of "
        "these kinds (several selectors go in a list, not a tuple)."
    )


def _flatten(selectors: Sequence[Any], verb: str | None, argument: str) -> list[Any]:
    flat: list[Any] = []
    for selector in selectors:
        if isinstance(selector, list):
            if not selector:
                raise SelectorError(
                    f"{_head(verb, argument, selector)} (an empty list) selects nothing; expected at least one selector in the list. "
                    "Fix: pass no selector to mean the whole model, or list the parts to select."
                )
            flat.extend(_flatten(selector, verb, argument))
        else:
            flat.append(selector)
    return flat


def resolve(
    model: nn.Module,
    *selectors: Selector,
    allow_empty: bool = False,
    verb: str | None = None,
    argument: str = "selectors",
) -> Selection:
    """Resolve selectors (a union) into every module and parameter path they name.

    The one resolver every verb is built on. A selected module brings its whole
    subtree (under the selected path only: a module shared under another name
    is not selected there); a selected parameter path brings just itself.

    Args:
        model: any ``nn.Module``.
        *selectors: as for :func:`select`; none means the whole model.
        allow_empty: return an empty part for a selector that matches nothing
            instead of raising.
        verb: the public verb resolving the selectors, named in error messages
            (``"freeze(selectors=...): ..."``); None names the selector alone.
        argument: the verb's argument that holds the selectors.

    Returns:
        A :class:`Selection`: ``matched`` (the names matched directly),
        ``modules`` and ``parameters`` (every path in the selected subtrees, in
        model order).

    Raises:
        SelectorError: a selector matched nothing (unless ``allow_empty``), an
            empty list, or a glob that is not valid.
        SelectorTypeError: a selector of an unsupported kind, or ``model`` is not a module.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> sel = resolve(model, "1")
        >>> sel.matched, list(sel.modules), list(sel.parameters)
        (['1'], ['1'], ['1.weight', '1.bias'])
    """
    require_module(model, verb or "resolve")
    model = unwrap(model)  # canonical names under DDP / torch.compile wrappers
    module_paths = _module_paths(model)
    param_items = _parameter_items(model)
    matched: dict[str, None] = {}  # ordered set
    if not selectors:
        matched[""] = None  # no selector: the whole model
    for selector in _flatten(selectors, verb, argument):
        head = _head(verb, argument, selector)
        names = _match_one(selector, module_paths, param_items, head)
        if not names and not allow_empty:
            raise _no_match(selector, module_paths, param_items, head)
        matched.update(dict.fromkeys(names))

    module_names = {n for n, _ in module_paths}
    roots = {n for n in matched if n in module_names}  # selected modules: their subtrees
    direct_params = set(matched) - module_names

    def under(name: str) -> bool:
        """True when ``name`` is a selected module or lies below one (checks each ancestor)."""
        if "" in roots:
            return True
        parts = name.split(".")
        return any(".".join(parts[:i]) in roots for i in range(1, len(parts) + 1))

    selection = Selection(matched=list(matched))
    selection.modules = {name: module for name, module in module_paths if under(name)}
    selection.parameters = {name: param for name, param in param_items if name in direct_params or under(name)}
    return selection


def select(model: nn.Module, *selectors: Selector) -> list[str]:
    """List the qualified names (modules and parameters) that selectors match directly.

    Args:
        model: any ``nn.Module``.
        *selectors: dotted names, globs, regexes, module types, predicates, module
            objects, or lists of these. None means the whole model (``[""]``).

    Returns:
        The matched names in model order (modules first, then parameters).

    Raises:
        SelectorError: a selector matched nothing; the message lists the closest names.
        SelectorTypeError: a selector of an unsupported kind.
        ArgumentTypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> select(model, "*.bias")
        ['0.bias', '2.bias']
        >>> select(model, nn.Linear)
        ['0', '2']
    """
    require_module(model, "select")
    return list(resolve(model, *selectors, verb="select").matched)
