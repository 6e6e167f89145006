"""Bounded YAML: every config file is checked before OmegaConf builds it.

OmegaConf turns each YAML node into an object, copying aliased nodes, so a few
hundred bytes of nested aliases (a "billion laughs" bomb) expand into billions
of nodes, deep nesting ends in a RecursionError, and a big file takes minutes.
:func:`check_yaml_text` reads the YAML *event stream* (libyaml, no recursion,
nothing built) and refuses, with a ConfigError naming the file, line and column:

- files over :data:`MAX_BYTES`, or not UTF-8 text, or not regular files (a FIFO
  would block forever);
- nesting deeper than :data:`MAX_DEPTH`;
- more than :data:`MAX_NODES` nodes once every alias is expanded (counted in
  one pass: an alias adds the size its anchor had);
- recursive or undefined aliases, several documents in one file;
- explicit tags other than the plain YAML types (``!!set``, ``!!binary``,
  ``!!python/...``): a config holds mappings, lists, strings, numbers,
  booleans and null;
- syntax errors, blamed on this file.

Hydra's config sources call it through :mod:`mimo_spec.hydra_guard`, and
:func:`load_yaml_file` (``build_model("x.yaml")``) calls it directly.

:func:`check_expansion` bounds the same way what ``${...}`` interpolations expand
to in a composed config (files and command line together), counted without
resolving: :func:`mimo_spec.hydra_guard.check_hydra_config` runs it first.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

from mimo_spec.errors import ConfigError, Problem

MAX_BYTES = 1 << 20  # 1 MiB: hand-written configs are a few KiB
MAX_DEPTH = 50  # nested mappings/lists; OmegaConf recurses about 6 frames per level
MAX_NODES = 50_000  # after alias expansion; OmegaConf builds about 20,000 nodes a second
PLAIN_TAGS = frozenset({"!"} | {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq")})
_HINT = "fix this config file"


def _where(source: str, mark) -> str:
    return f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(source)


def yaml_error(err, source: str) -> ConfigError:
    """A PyYAML error as a ConfigError naming ``source`` (the file) with line and column."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    text = f"YAML syntax error: {problem}" + (f" ({context})" if context else "")
    return ConfigError(Problem(_where(source, mark), text, "fix the YAML syntax in this file"))


def read_yaml_file(path: str | os.PathLike, top_mapping: bool = True) -> str:
    """The text of a YAML config file, after :func:`check_yaml_text`; ConfigError for anything unfit."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}", path=str(path), hint="check the path") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e.strerror or e}", path=str(path), hint=_HINT) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError("not a regular file (a folder, device or pipe cannot be a config file)", path=str(path),
                          hint="point at a .yaml file")
    _check_size(st.st_size, str(path))
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e.strerror or e}", path=str(path), hint=_HINT) from None
    _check_size(len(data), str(path))
    text = decode_yaml_bytes(data, str(path))
    check_yaml_text(text, str(path), top_mapping)
    return text


def decode_yaml_bytes(data: bytes, source: str) -> str:
    _check_size(len(data), source)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte {e.start}): a config file must be a UTF-8 YAML file", path=source,
                          hint=_HINT) from None


def _check_size(size: int, source: str) -> None:
    if size > MAX_BYTES:
        raise ConfigError(f"config file is too large: {size:,} bytes (at most {MAX_BYTES:,} bytes are read)",
                          path=source, hint="a config describes a run; keep data and weights in their own files")


def check_yaml_text(text: str, source: str, top_mapping: bool = True) -> None:
    """Refuse YAML that is too big, too deep, expands too far, carries odd tags or does not parse
    (and, with ``top_mapping``, that is not a mapping at the top, as every config file is)."""
    import yaml
    from yaml import events as ev

    if len(text) > MAX_BYTES // 4:  # a character is at most 4 bytes: only long texts need counting
        _check_size(len(text.encode("utf-8", "surrogatepass")), source)
    loader = getattr(yaml, "CSafeLoader", None) or yaml.SafeLoader
    open_nodes: list[tuple[str | None, int]] = []  # (anchor, expanded count when the node started)
    sizes: dict[str, int] = {}  # anchor -> nodes it expands to
    expanded = 0
    documents = 0
    try:
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, ev.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise ConfigError(Problem(_where(source, event.start_mark), "more than one YAML document ('---')",
                                              "keep one document per config file"))
                continue
            if not isinstance(event, (ev.NodeEvent, ev.CollectionEndEvent)):
                continue
            if top_mapping and not open_nodes and not isinstance(event, (ev.MappingStartEvent,
                                                                         ev.CollectionEndEvent)) and not (
                    isinstance(event, ev.ScalarEvent) and event.tag is None and event.value in ("", "~", "null")):
                got = "a list" if isinstance(event, ev.SequenceStartEvent) else "a single value"
                raise ConfigError(Problem(_where(source, event.start_mark), f"expected a mapping (key: value lines) "
                                          f"at the top of the file, got {got}", "write the config as key: value lines"))
            tag = getattr(event, "tag", None)
            if tag is not None and tag not in PLAIN_TAGS:
                shown = tag.replace("tag:yaml.org,2002:", "!!")
                raise ConfigError(Problem(
                    _where(source, event.start_mark), f"YAML tag {shown!r} is not allowed: a config holds only "
                    "mappings, lists, strings, numbers, booleans and null", "remove the tag (write a set as a list)"))
            if isinstance(event, ev.AliasEvent):
                if event.anchor not in sizes:
                    what = ("refers to itself (a recursive alias)" if any(a == event.anchor for a, _ in open_nodes)
                            else "has no anchor before it")
                    raise ConfigError(Problem(_where(source, event.start_mark), f"YAML alias *{event.anchor} {what}",
                                              "define the anchor (&name) before using it, outside the node itself"))
                expanded += sizes[event.anchor]
            elif isinstance(event, ev.CollectionStartEvent):
                if len(open_nodes) >= MAX_DEPTH:
                    raise ConfigError(Problem(_where(source, event.start_mark),
                                              f"nested more than {MAX_DEPTH} levels deep",
                                              "a config is a shallow tree; flatten this part"))
                open_nodes.append((event.anchor, expanded))
                expanded += 1
            elif isinstance(event, ev.CollectionEndEvent):
                anchor, start = open_nodes.pop()
                if anchor is not None:
                    sizes[anchor] = expanded - start
            else:  # a scalar
                expanded += 1
                if event.anchor is not None:
                    sizes[event.anchor] = 1
            if expanded > MAX_NODES:
                raise ConfigError(Problem(
                    _where(source, event.start_mark), f"expands to more than {MAX_NODES:,} values"
                    + (" once its aliases are expanded (an alias bomb?)" if sizes else ""),
                    "write a smaller config; aliases (*name) copy the whole anchored node each time"))
    except yaml.YAMLError as e:
        raise yaml_error(e, source) from None


def load_yaml_file(path: str | os.PathLike):
    """A checked YAML file as a DictConfig (no object construction, bounded size)."""
    import yaml
    from omegaconf import OmegaConf

    text = read_yaml_file(path)
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.create(text)
        check_expansion(OmegaConf.to_container(cfg, resolve=False), str(path))  # interpolation bombs too
        return cfg
    except yaml.YAMLError as e:  # e.g. a duplicate key
        raise yaml_error(e, str(path)) from None
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0], path=str(path), hint=_HINT) from None


# --- interpolations ---------------------------------------------------------------------------------
MAX_TEXT = 10 << 20  # characters a config's values may expand to once every ${...} is followed
MAX_EXPANDED_DEPTH = 100  # nesting levels, counting each ${...} followed; OmegaConf recurses on each
_KEY = re.compile(r"\.*(?:[\w\-]+|\[\d+\])(?:\.[\w\-]+|\[\d+\])*|\.+")
_RESOLVER = re.compile(r"\s*([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)\s*:(.*)\Z", re.S)


def check_expansion(data, shown_root: str = "config") -> None:
    """Refuse a config (the raw container, ``OmegaConf.to_container(cfg, resolve=False)``) whose
    values, once every ``${...}`` is followed, would exceed :data:`MAX_NODES` values or
    :data:`MAX_TEXT` characters, or nest deeper than :data:`MAX_EXPANDED_DEPTH`: an interpolation
    bomb (ten lists of ten ``${previous}``, a string doubling itself 40 times) would otherwise keep
    OmegaConf resolving for hours. Counted without resolving anything, each node once (memoised);
    a reference cycle is left for OmegaConf to report."""
    sizes: dict[tuple, tuple[int, int]] = {}
    depths: dict[tuple, int] = {}  # levels below each node, its interpolations followed
    busy: set[tuple] = set()

    def shown(keys: tuple) -> str:
        out = ""
        for k in keys:
            out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
        return out or shown_root

    def refuse(keys: tuple, what: str, hint: str = "") -> None:
        raise ConfigError(Problem(shown(keys), what, hint or "write the values out, or reference smaller parts: "
                                  "each ${...} copies what it names every time it is used (an interpolation bomb?)"))

    def too_deep(keys: tuple, levels: int) -> None:
        if levels > MAX_EXPANDED_DEPTH:
            refuse(keys, f"nested more than {MAX_EXPANDED_DEPTH} levels deep once its interpolations are "
                   "followed (OmegaConf resolves each level recursively)",
                   "shorten the chain: reference the value itself, not a key that references it")

    def lookup(keys: tuple) -> tuple[tuple, Any] | None:
        node = data
        for i, k in enumerate(keys):
            if isinstance(node, dict) and k in node:
                node = node[k]
            elif isinstance(node, dict) and isinstance(k, str) and k.isdigit() and int(k) in node:
                node = node[int(k)]
            elif isinstance(node, list) and str(k).lstrip("-").isdigit() and -len(node) <= int(k) < len(node):
                k = int(k) % len(node)
                node = node[k]
            elif isinstance(node, str):  # reached through an interpolation: charge all of it
                return keys[:i], node
            else:
                return None
            keys = keys[:i] + (k,) + keys[i + 1:]
        return keys, node

    def key_path(text: str, base: tuple) -> tuple | None:
        text = text.strip()
        if not _KEY.fullmatch(text):
            return None
        dots = len(text) - len(text.lstrip("."))
        rest = text[dots:]
        if dots:
            if dots > len(base) + 1:
                return None
            start = base[: len(base) - (dots - 1)]
        else:
            start = ()
        keys = tuple(re.findall(r"\[(\d+)\]|([\w\-]+)", rest))
        return start + tuple(a or b for a, b in keys)

    def size(keys: tuple, depth: int) -> tuple[int, int]:
        if keys in sizes:
            too_deep(keys, depth + depths[keys])
            return sizes[keys]
        if keys in busy:  # a cycle: OmegaConf reports it when it resolves
            return 1, 0
        too_deep(keys, depth)
        found = lookup(keys)
        if found is None:
            return 1, 0
        keys, node = found
        if keys in sizes:
            too_deep(keys, depth + depths[keys])
            return sizes[keys]
        busy.add(keys)
        try:
            below = 0
            if isinstance(node, dict):
                values, chars = 1, 2
                for k, v in node.items():
                    n, c = size(keys + (k,), depth + 1)
                    values, chars = values + n, chars + c + len(str(k)) + 2
                    below = max(below, 1 + depths.get(keys + (k,), 0))
            elif isinstance(node, list):
                values, chars = 1, 2
                for i in range(len(node)):
                    n, c = size(keys + (i,), depth + 1)
                    values, chars = values + n, chars + c + 2
                    below = max(below, 1 + depths.get(keys + (i,), 0))
            elif isinstance(node, str) and "${" in node:
                values, chars, below = string_size(node, keys, depth)
            else:
                values, chars = 1, len(str(node))
            too_deep(keys, depth + below)
            if values > MAX_NODES:
                refuse(keys, f"expands to more than {MAX_NODES:,} values once its interpolations are followed")
            if chars > MAX_TEXT:
                refuse(keys, f"expands to more than {MAX_TEXT:,} characters once its interpolations are followed")
            sizes[keys], depths[keys] = (values, chars), below
            return values, chars
        finally:
            busy.discard(keys)

    def string_size(text: str, keys: tuple, depth: int) -> tuple[int, int]:
        base = keys[:-1]
        values, chars, below = 0, len(text), 0
        nested = _nesting(text)
        if nested > MAX_DEPTH:  # OmegaConf's grammar parses (and resolves) each level recursively
            refuse(keys, f"its interpolation is nested {nested} levels deep (at most {MAX_DEPTH})",
                   "write the value out, or split it over several keys")
        bodies = _interpolations(text)
        if "oc.decode" in text:  # decode parses the text its argument resolves to: pieces may join into ${...}
            joined = text
            for _ in range(4):
                joined, before = _static_text(joined, base), joined
                if joined == before:
                    break
            bodies += _interpolations(joined) if joined != text else []
        for body in bodies:
            refs = []
            m = _RESOLVER.match(body)
            if m:  # a resolver's bare arguments may name keys (oc.select, oc.dict.values, hydra:)
                prefix = ("hydra",) if m.group(1) == "hydra" else ()
                for arg in _split_args(m.group(2)):
                    path = key_path(arg.strip().strip("'\""), base)
                    if path is not None:
                        refs.append(prefix + path if not arg.strip().startswith(".") else path)
            else:
                path = key_path(_static_text(body, base), base)
                if path is not None:
                    refs.append(path)
            for path in refs:
                if lookup(path) is None:
                    continue
                n, c = size(path, depth + 1)
                values, chars = values + n, chars + c
                target = lookup(path)[0]
                below = max(below, 1 + depths.get(target, 0))
        return max(values, 1), chars, below

    def _static_text(body: str, base: tuple) -> str:
        """A key made of interpolations (``${${name}}``): the plain values they name, put in."""
        def put(m):
            found = key_path(m.group(1), base)
            found = lookup(found) if found is not None else None
            value = found[1] if found is not None else None
            return str(value) if isinstance(value, (str, int)) and "${" not in str(value) else m.group(0)

        return re.sub(r"\$\{([^${}]*)\}", put, body) if "${" in body else body

    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * MAX_EXPANDED_DEPTH * 4 + 2000))
    try:  # the run's own keys first: a bomb is named where it is, not where hydra.overrides quotes it
        for key in data if isinstance(data, dict) else ():
            if key != "hydra":
                size((key,), 0)
        size((), 0)
    finally:
        sys.setrecursionlimit(limit)


def _interpolations(text: str) -> list[str]:
    """The body of every ``${...}`` in ``text``, nested ones included (escaped ones too: oc.decode
    reads them)."""
    out = []
    start = text.find("${")
    while start != -1:
        depth, i, quote = 0, start + 1, None
        while i < len(text):
            ch = text[i]
            if quote:
                if ch == "\\":
                    i += 1
                elif ch == quote:
                    quote = None
            elif ch in "'\"":
                quote = ch
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        out.append(text[start + 2:i])
        start = text.find("${", start + 2)
    return out


def _nesting(text: str) -> int:
    """The deepest nesting of braces and brackets in ``text``."""
    depth = deepest = 0
    for ch in text:
        if ch in "{[":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "}]":
            depth -= 1
    return deepest


def _split_args(text: str) -> list[str]:
    """A resolver's arguments, split at top-level commas."""
    args, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(current)
            current = ""
            continue
        current += ch
    args.append(current)
    return args
