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
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

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


def read_yaml_file(path: str | os.PathLike) -> str:
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
    check_yaml_text(text, str(path))
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


def check_yaml_text(text: str, source: str) -> None:
    """Refuse YAML that is too big, too deep, expands too far, carries odd tags or does not parse."""
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
            if not open_nodes and not isinstance(event, (ev.MappingStartEvent, ev.CollectionEndEvent)) and not (
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
        return OmegaConf.create(text)
    except yaml.YAMLError as e:  # e.g. a duplicate key
        raise yaml_error(e, str(path)) from None
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0], path=str(path), hint=_HINT) from None
