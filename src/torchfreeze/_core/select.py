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

from torch import nn

from torchfreeze._core.checks import require_module
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


def glob_to_regex(pattern: str) -> str:
    """Translate a dotted glob into an equivalent full-match regular expression.

    ``*`` matches within one path segment, ``**`` as a whole segment matches any
    number of segments (zero included), ``?`` one character of a segment.

    Args:
        pattern: a glob over qualified names, such as ``"encoder.*.bias"``.

    Returns:
        A regex string to use with ``re.fullmatch``.

    Example:
        >>> import re
        >>> bool(re.fullmatch(glob_to_regex("**.bias"), "encoder.0.bias"))
        True
        >>> bool(re.fullmatch(glob_to_regex("encoder.*"), "encoder.0.weight"))
        False
    """
    segments: list[str] = []
    for segment in pattern.split("."):
        if not (segment == "**" and segments and segments[-1] == "**"):  # "**.**" is "**"
            segments.append(segment)
    out = ""
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            if not last:  # zero or more whole segments, each with its dot
                out += r"(?:[^.]+\.)*"
            elif index == 0:
                out += r".+"
            else:  # "a.**": "a" itself or anything below it
                out = out[: -len(r"\.")] + r"(?:\..+)?"
            continue
        piece = ""
        i = 0
        while i < len(segment):
            char = segment[i]
            if char == "*":
                piece += r"[^.]*"
            elif char == "?":
                piece += r"[^.]"
            elif char == "[":
                end = segment.find("]", i + 1)
                if end == -1:
                    piece += re.escape(char)
                else:
                    body = segment[i + 1 : end]
                    if body.startswith("!"):
                        body = "^" + body[1:]
                    piece += "[" + body + "]"
                    i = end
            else:
                piece += re.escape(char)
            i += 1
        out += piece + ("" if last else r"\.")
    return out


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
    if isinstance(selector, re.Pattern):
        return f"re.compile({selector.pattern!r})"
    if isinstance(selector, type):
        return selector.__name__
    if isinstance(selector, nn.Module):
        return f"<{type(selector).__name__} object>"
    return repr(selector)


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
            if _match_one(deeper, module_paths, param_items):
                out.append(deeper)
        except SelectorError:  # target is not a valid glob: no glob suggestion
            pass
    for name in _closest(target, names):
        if name not in out and _match_one(name, module_paths, param_items):
            out.append(name)
    return out


def _no_match(
    selector: Any, module_paths: list[tuple[str, nn.Module]], param_items: list[tuple[str, nn.Parameter]]
) -> SelectorError:
    if isinstance(selector, str):
        target = selector
    elif isinstance(selector, re.Pattern):
        target = selector.pattern
    else:
        target = _describe(selector)
    suggestions = ", ".join(repr(n) for n in _suggestions(target, module_paths, param_items))
    return SelectorError(
        f"selector {_describe(selector)} matched no module or parameter of the model. "
        + (f"Fix: use one of these selectors, which match: {suggestions}; " if suggestions else "Fix: ")
        + "call torchfreeze.select(model, ...) to see what a selector matches."
    )


def _match_one(
    selector: Any,
    module_paths: list[tuple[str, nn.Module]],
    param_items: list[tuple[str, nn.Parameter]],
) -> list[str]:
    """Return the qualified names (modules and parameters) one selector matches."""
    if isinstance(selector, str):
        if not selector:
            raise SelectorError(
                "selector '' (an empty string) names nothing; expected a dotted name or glob such as "
                "'encoder' or '**.bias'. Fix: pass no selector at all to mean the whole model."
            )
        exact = [n for n, _ in module_paths if n == selector] + [n for n, _ in param_items if n == selector]
        if exact or not _GLOB_CHARS & set(selector):  # a real name wins, even one like "a[1]"
            return exact
        try:
            regex = re.compile(glob_to_regex(selector))
        except re.error as error:
            raise SelectorError(
                f"selector {selector!r} is not a valid glob ({error}); expected '*' within a segment, "
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
                f"selector type {selector.__name__} is not an nn.Module subclass; "
                "expected a module type such as nn.BatchNorm2d. Fix: pass a module class or a tuple of them."
            )
        return [n for n, m in module_paths if isinstance(m, selector)]
    if isinstance(selector, tuple) and selector and all(isinstance(t, type) for t in selector):
        for t in selector:
            if not issubclass(t, nn.Module):
                raise SelectorTypeError(
                    f"selector tuple contains {t.__name__}, which is not an nn.Module subclass; expected "
                    "module classes only, e.g. (nn.BatchNorm1d, nn.BatchNorm2d). Fix: put other selectors "
                    "in a list instead."
                )
        return [n for n, m in module_paths if isinstance(m, selector)]
    if isinstance(selector, nn.Module):
        return [n for n, m in module_paths if m is selector]
    if callable(selector):
        matched = []
        for name, module in module_paths:
            result = selector(name, module)
            if not isinstance(result, bool):
                raise SelectorTypeError(
                    f"predicate selector {_describe(selector)} returned {type(result).__name__} for "
                    f"{name!r}; expected a bool from (name, module) -> bool. Fix: return True or False."
                )
            if result:
                matched.append(name)
        return matched
    raise SelectorTypeError(
        f"selector {selector!r} of type {type(selector).__name__} is not understood; expected a dotted "
        "name or glob (str), a compiled regex, a module type or tuple of types, a predicate "
        "(name, module) -> bool, a module object in the model, or a list of these. Fix: pass one of "
        "these kinds (several selectors go in a list, not a tuple)."
    )


def _flatten(selectors: Sequence[Any]) -> list[Any]:
    flat: list[Any] = []
    for selector in selectors:
        if isinstance(selector, list):
            if not selector:
                raise SelectorError(
                    "selector [] (an empty list) selects nothing; expected at least one selector in the list. "
                    "Fix: pass no selector to mean the whole model, or list the parts to select."
                )
            flat.extend(_flatten(selector))
        else:
            flat.append(selector)
    return flat


def resolve(model: nn.Module, *selectors: Selector, allow_empty: bool = False) -> Selection:
    """Resolve selectors (a union) into every module and parameter path they name.

    The one resolver every verb is built on. A selected module brings its whole
    subtree (under the selected path only: a module shared under another name
    is not selected there); a selected parameter path brings just itself.

    Args:
        model: any ``nn.Module``.
        *selectors: as for :func:`select`; none means the whole model.
        allow_empty: return an empty part for a selector that matches nothing
            instead of raising.

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
    require_module(model, "resolve")
    model = unwrap(model)  # canonical names under DDP / torch.compile wrappers
    module_paths = _module_paths(model)
    param_items = _parameter_items(model)
    matched: dict[str, None] = {}  # ordered set
    if not selectors:
        matched[""] = None  # no selector: the whole model
    for selector in _flatten(selectors):
        names = _match_one(selector, module_paths, param_items)
        if not names and not allow_empty:
            raise _no_match(selector, module_paths, param_items)
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
    return list(resolve(model, *selectors).matched)
