"""Config values checked against the type hints of the callables Hydra will pass them to.

Why: Hydra instantiates `data`, `objective` and the model only when a stage starts, and a value of
the wrong type (`data.batch_size=abc`) then fails deep inside, as a bare TypeError, possibly after
other rows have trained. The hints are already written on every `_target_`'s signature; reading
them lets the run refuse such a value up front, naming the key and the expected type.

The check is deliberately lenient: what it cannot interpret (Any, unannotated parameters,
classes other than the builtin scalars, a hint that does not evaluate) is accepted, and a value
that is itself a `_target_` node is checked as a node of its own rather than against the hint
(it becomes an object only when instantiated).
"""

from __future__ import annotations

import collections.abc as abc
import inspect
import os
import types
import typing
from pathlib import PurePath
from typing import Any, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

#: Hydra's own keys of an instantiable node, never arguments of the target.
HYDRA_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")

_SEQUENCES = (list, tuple, abc.Sequence, abc.MutableSequence, abc.Iterable, abc.Collection)
_MAPPINGS = (dict, abc.Mapping, abc.MutableMapping)
_UNSURE = object()   # "cannot interpret this hint": the value is accepted
#: (argument, value) pairs that embedkit replaces before the target sees them: an optimiser's
#: `fused: auto` becomes True or is left out (embedkit/objectives/base.py, resolve_fused).
DECIDED_BEFORE_THE_CALL = {("fused", "auto")}


def target_nodes(node: Any, key: str) -> Iterator[tuple[str, DictConfig]]:
    """(dotted key, node) of every `_target_` node at or below `node`, outermost first; the
    insides of a target node are left to `check_node`, which walks its own arguments."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield key, node
            return
        for k in node:
            yield from target_nodes(_child(node, k), f"{key}.{k}")
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from target_nodes(_child(node, i), f"{key}.{i}")


def _child(node: DictConfig | ListConfig, k: Any) -> Any:
    """`node[k]`, resolved; None where it does not resolve (the node's own check reports that)."""
    try:
        return node[k]
    except Exception:   # noqa: BLE001  an interpolation to a missing node: not a nested target
        return None


def check_node(node: DictConfig, key: str) -> list[str]:
    """Problems of one `_target_` node (`key` is its dotted path) and of the target nodes in it."""
    problems: list[str] = []
    target = node.get("_target_")
    try:
        from hydra.utils import get_object

        fn = get_object(str(target))
    except Exception as err:   # noqa: BLE001  any import failure is the config's problem to report
        return [f"{key}._target_: cannot import {target!r} ({type(err).__name__}: {err})"]
    params, hints, takes_kwargs = _signature(fn)
    for k in node:
        if k in HYDRA_KEYS:
            continue
        path = f"{key}.{k}"
        if OmegaConf.is_missing(node, k):
            continue   # `???`: Hydra reports a missing mandatory value itself, by key
        try:
            raw = node[k]
        except Exception as err:   # noqa: BLE001  a broken interpolation: name the key
            problems.append(f"{path}: {err}")
            continue
        nested = list(target_nodes(raw, path))
        for sub_key, sub in nested:
            problems += check_node(sub, sub_key)
        if params is None:
            continue
        param = params.get(str(k))
        if param is None:
            if not takes_kwargs:
                named = [p for p, v in params.items() if v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
                problems.append(f"{path}: {_name(fn)} takes no argument {k!r}; it takes {', '.join(named)}")
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if str(k) not in hints or (nested and nested[0][0] == path):
            continue   # unannotated, or itself an instantiable node
        try:
            value = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else raw
        except Exception as err:   # noqa: BLE001  an interpolation inside it does not resolve
            problems.append(f"{path}: {err}")
            continue
        if value is None and param.default is None:
            continue   # `x: int = None`: None is the documented "not set"
        if isinstance(value, str) and (str(k), value) in DECIDED_BEFORE_THE_CALL:
            continue
        if _matches(value, hints[str(k)]) is False:
            origin = f" (from {_raw(node, k)})" if OmegaConf.is_interpolation(node, k) else ""
            problems.append(f"{path}: expected {describe(hints[str(k)])}, got {value!r} "
                            f"({type(value).__name__}){origin}")
    return problems


def _raw(node: DictConfig, k: Any) -> str:
    return str(node._get_node(k)._value())   # the interpolation as written, e.g. ${objective.x}


def _name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"


def _signature(fn: Any) -> tuple[dict[str, inspect.Parameter] | None, dict[str, Any], bool]:
    """(parameters, evaluable type hints, takes **kwargs) of a class or function; parameters is
    None where there is no signature to read (a builtin)."""
    try:
        params = dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None, {}, True
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    func = fn.__init__ if inspect.isclass(fn) else fn
    try:
        hints = typing.get_type_hints(func)
    except Exception:   # noqa: BLE001  one unevaluable hint (a TYPE_CHECKING import): go one by one
        hints = {}
        namespace = dict(getattr(func, "__globals__", {}))
        for name, annotation in getattr(func, "__annotations__", {}).items():
            try:
                hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation
            except Exception:   # noqa: BLE001  this one is not checked
                continue
    # A class may present its real arguments as `__signature__` with evaluated hints (an objective's
    # loss arguments and shared settings, embedkit/objectives/base.py): those count too.
    for name, p in params.items():
        if name not in hints and p.annotation is not p.empty and not isinstance(p.annotation, str):
            hints[name] = p.annotation
    hints.pop("return", None)
    return params, hints, takes_kwargs


def _matches(value: Any, hint: Any) -> bool | object:
    """True or False where the hint is understood; `_UNSURE` where it is not."""
    if hint is Any or hint is inspect.Parameter.empty or isinstance(hint, (str, typing.TypeVar)):
        return _UNSURE
    if isinstance(value, dict) and "_target_" in value:
        return _UNSURE   # built by Hydra into whatever the target returns
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        results = [_matches(value, a) for a in args]
        if any(r is True for r in results):
            return True
        return _UNSURE if any(r is _UNSURE for r in results) else False
    if origin is typing.Literal:
        return value in args
    if origin is typing.Annotated:
        return _matches(value, args[0])
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (PurePath, os.PathLike) or (inspect.isclass(hint) and issubclass(hint, PurePath)):
        return isinstance(value, (str, PurePath))
    container = origin or hint
    if container in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False   # a string is a sequence too, but never the list a config means
        if container is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                return False
            return _all(_matches(v, a) for v, a in zip(value, args))
        return _all(_matches(v, args[0]) for v in value) if args else True
    if container in _MAPPINGS:
        if not isinstance(value, dict):
            return False
        if len(args) == 2:
            return _all(r for k, v in value.items() for r in (_matches(k, args[0]), _matches(v, args[1])))
        return True
    return _UNSURE   # a class, a Callable, a Protocol: what a config holds cannot show it


def _all(results: typing.Iterable[bool | object]) -> bool:
    """Every element matches, or cannot be judged."""
    return not any(r is False for r in results)


def describe(hint: Any) -> str:
    """A hint the way the error message reads it: "int or None", "list of int"."""
    if hint is None or hint is type(None):
        return "None"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        # Literal members read as one list of allowed values (Lightning's `precision`)
        literal = [a for a in args if typing.get_origin(a) is typing.Literal]
        allowed = [v for a in literal for v in typing.get_args(a)]
        parts = [describe(a) for a in args if a is not type(None) and a not in literal]
        if allowed:
            parts.insert(0, "one of " + ", ".join(repr(v) for v in allowed))
        return " or ".join(parts + (["None"] if type(None) in args else []))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    container = origin or hint
    if container in _SEQUENCES:
        if container is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(describe(a) for a in args)})"
        return f"list of {describe(args[0])}" if args else "list"
    if container in _MAPPINGS:
        return f"mapping of {describe(args[0])} to {describe(args[1])}" if len(args) == 2 else "mapping"
    if hint in (PurePath, os.PathLike) or (inspect.isclass(hint) and issubclass(hint, PurePath)):
        return "path"
    return getattr(hint, "__name__", str(hint))
