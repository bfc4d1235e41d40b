"""The YAML of config files, ``key=value`` overrides and sweep spaces, and its errors on one line.

YAML 1.2 scalars: only true / false are booleans and ``1e-4`` is a number. A key given twice in
one mapping is an error (YAML loaders silently keep the last value). PyYAML's own error messages
span several lines and draw a caret; :func:`yaml_error_text` puts one on a line, for the
``error: ...`` line the CLI prints.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from scrollsam.errors import ConfigError
from scrollsam.fs_errors import read_failure


class _Loader(yaml.SafeLoader):
    """YAML with 1.2 scalars: only true / false are booleans (1.1 also reads yes, no, on, off:
    ``train.cache=off`` became False) and ``1e-4`` is a number (1.1 wants ``1.0e-4``)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def parse_yaml(text: str, *, key: str = "", sep: str = ".") -> Any:
    """``text`` as YAML with 1.2 scalars (config files, overrides, sweep spaces); raises
    ``yaml.YAMLError`` (see :func:`yaml_error_text`), and :class:`ConfigError` for a key given
    twice (see :func:`check_unique_keys`; ``key`` and ``sep`` name it)."""
    loader = _Loader(text)  # a SafeLoader subclass: no arbitrary objects
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check_unique_keys(node, key=key, sep=sep)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def check_unique_keys(node: yaml.Node, *, key: str = "", sep: str = ".",
                      _done: set[int] | None = None) -> None:
    """Raise :class:`ConfigError` ``<key>: given twice, at lines A and B`` (1-based; on one
    line, ``at line L, columns A and B``) when a mapping under ``node`` gives a scalar key
    twice. The key is named from the root, its parts joined by ``sep`` (``train.lr``; a sweep
    space, whose keys are dotted already, passes ``": "`` for ``train.lr: low``) and prefixed
    with ``key`` (an override's key) when given."""
    done = set() if _done is None else _done  # an alias can hold its own anchor (&a [*a])
    if id(node) in done:
        return
    done.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            check_unique_keys(item, key=key, sep=sep, _done=done)
    elif isinstance(node, yaml.MappingNode):
        seen: dict[str, yaml.Mark] = {}
        for k, value in node.value:
            name, mark = f"{key}{sep if key else ''}{k.value}", k.start_mark
            if isinstance(k, yaml.ScalarNode) and name in seen:
                raise ConfigError(f"{name}: given twice, {_places(seen[name], mark)}")
            seen[name] = mark
            check_unique_keys(value, key=name, sep=sep, _done=done)


def _places(first: yaml.Mark, second: yaml.Mark) -> str:
    """``at lines A and B``, or on one line (an override's flow mapping) ``at line L, columns
    A and B``; 1-based."""
    if first.line != second.line:
        return f"at lines {first.line + 1} and {second.line + 1}"
    return f"at line {first.line + 1}, columns {first.column + 1} and {second.column + 1}"


def flow_yaml(value: Any) -> str:
    """``value`` as one line of flow YAML (``[1, 2]``, ``{kind: slices}``, ``abc``), as tables
    and messages show a config value; no document-end marker."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    return text.removesuffix("\n...")


def yaml_error_text(err: yaml.YAMLError, text: str) -> str:
    """PyYAML's error on one line, places 1-based: ``<problem> at line L, column C`` and, where
    PyYAML names one, ``; while parsing a flow sequence at line L, column C`` (its own message
    spans lines and draws a caret). ``text`` is what was parsed."""
    if isinstance(err, yaml.MarkedYAMLError):
        what = err.problem or err.context or type(err).__name__
        line = _at(what, err.problem_mark or err.context_mark)
        if err.problem and err.context:
            line += "; " + _at(err.context, err.context_mark)
    elif isinstance(err, yaml.reader.ReaderError):
        char = err.character if isinstance(err.character, int) else ord(err.character)
        before = text[:err.position]
        line = (f"unacceptable character #x{char:04x}: {err.reason} at line "
                f"{before.count(chr(10)) + 1}, column {len(before) - before.rfind(chr(10))}")
    else:
        line = str(err)
    return " ".join(line.split())


def _at(what: str, mark: yaml.Mark | None) -> str:
    return what if mark is None else f"{what} at line {mark.line + 1}, column {mark.column + 1}"


def expect_file(path: Path, what: str) -> None:
    """A :class:`ConfigError` unless ``path`` is a regular file (or a link to one): ``config
    file not found``, ``expected a config file, got a folder``, ``... got a device or other
    special file`` (``/dev/null``), ``cannot read the config file: it is a link to a missing
    file, ...``; ``what`` names the file (``config file``, ``space file``)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno.ENOENT and not os.path.islink(path):
            raise ConfigError(f"{what} not found ({path})") from None
        raise ConfigError(f"cannot read the {what}: {read_failure(err, path)} ({path})") from None
    if not stat.S_ISREG(mode):
        got = "a folder" if stat.S_ISDIR(mode) else "a device or other special file"
        raise ConfigError(f"expected a {what}, got {got} ({path})")


def load_yaml_file(path: Path, *, sep: str = ".") -> Any:
    """The YAML file at ``path`` (see :func:`parse_yaml`, which takes ``sep``); a file that
    cannot be read, is not valid YAML or gives a key twice is a one-line :class:`ConfigError`
    naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"not valid YAML: not UTF-8 text at byte offset {err.start} "
                          f"({path})") from err
    except OSError as err:
        raise ConfigError(f"cannot read the file: {err.strerror or err} ({path})") from err
    try:
        return parse_yaml(text, sep=sep)
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {yaml_error_text(err, text)} ({path})") from err
    except ConfigError as err:
        raise ConfigError(f"{err} ({path})") from None
