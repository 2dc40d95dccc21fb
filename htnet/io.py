"""Safe file handling: atomic writes, paths kept under their root, text and YAML read with one-line
errors (docs/design.md, Errors)."""
import contextlib
import fcntl
import json
import os
import re
import tempfile
from pathlib import Path

from htnet.errors import UserError, first_line

# Ids that become file names: every id of the real release fits ('sub01', '006', 'EP02_01f'); no leading '.', no '..'.
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", re.ASCII)
SAFE_NAME_RULE = "letters, digits, '.', '_', '-'"
# Refused before they are built: YAML far too big, or expanding through aliases ("billion laughs").
MAX_YAML_BYTES = 4 * 1024 * 1024
MAX_YAML_NODES = 200_000  # after alias expansion; a search space or config has a few hundred
MAX_JSON_DEPTH = 16  # a fold record nests 4 deep


@contextlib.contextmanager
def atomic_write(path, mode="w", **open_kwargs):
    """A temporary file beside `path`, fsynced and renamed over it on success; an OSError (full disk,
    quota, file size limit) is one UserError line, the temporary file removed and the old `path` kept."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write to folder {path.parent}: {e.strerror}") from None
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def write_files(contents):
    """{path: str or bytes} written all or none: every file is fsynced before any is renamed."""
    with contextlib.ExitStack() as stack:
        for path, data in contents.items():
            f = stack.enter_context(atomic_write(path, "wb" if isinstance(data, bytes) else "w"))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def is_safe_name(name):
    return isinstance(name, str) and SAFE_NAME.fullmatch(name) is not None and ".." not in name


def path_under(root, *parts):
    """root/parts, or UserError where it resolves outside `root` (an absolute part, '..', a symlink)."""
    root = Path(root)
    path = root.joinpath(*map(str, parts))
    if "\x00" in str(path):
        raise UserError(f"{path!r}: not a valid path (contains a NUL byte)")
    real_root, real = root.resolve(), path.resolve()
    if real == real_root or not real.is_relative_to(real_root):
        raise UserError(f"{path} resolves to {real}, outside {root}")
    return path


@contextlib.contextmanager
def file_lock(path):
    """An exclusive flock on `path` for the block; the kernel drops it when the holder dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def ensure_writable_dir(path):
    """`path`, created if needed, once a file could be written there."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"output folder {path} is not writable: {e.strerror}") from None
    return path


def parse_yaml(text, where):
    """yaml.safe_load of `text` (str or bytes) within the limits above; `where` names the file or flag."""
    import yaml

    if isinstance(text, bytes) and len(text) > MAX_YAML_BYTES:
        raise UserError(f"{where}: {len(text)} bytes is too big for a YAML file (limit {MAX_YAML_BYTES})")
    text, loader = decode_text(text, where), None
    try:  # parsed once: the node graph is sized first, then built into Python values
        loader = yaml.SafeLoader(text)  # it refuses non-printable characters: inside the try
        node = loader.get_single_node()
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise UserError(f"{where}: YAML expands to over {MAX_YAML_NODES} values through its "
                            f"aliases: refusing a possible alias bomb")
        return None if node is None else loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(e, "problem", None) or first_line(e)
        raise UserError(f"{where}:{line} not valid YAML ({problem})") from None
    except RecursionError:
        raise UserError(f"{where}: YAML nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def _expanded_size(node, memo):
    """Values the node stands for with aliases expanded (each shared node sized once, counted per use)."""
    import yaml

    if not isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
        return 1
    if id(node) not in memo:
        memo[id(node)] = MAX_YAML_NODES + 1  # a node that contains itself expands without end
        children = node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair]
        memo[id(node)] = 1 + sum(_expanded_size(child, memo) for child in children)
    return memo[id(node)]


def read_yaml(path, where=None):
    """parse_yaml of a file; a missing or unreadable file is one line too."""
    return parse_yaml(read_bytes(path, where, MAX_YAML_BYTES, "a YAML file"), where or str(path))


def read_json(path, max_bytes):
    """A JSON file's value within `max_bytes` and MAX_JSON_DEPTH levels of nesting; else one UserError line."""
    text = decode_text(read_bytes(path, max_bytes=max_bytes, kind="a JSON file"), path)
    try:
        value = json.loads(text)
    except RecursionError:
        raise UserError(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({first_line(e)})") from None
    level = [("", value)]   # (where in the value, the value): level by level, no recursion
    for _ in range(MAX_JSON_DEPTH):
        level = [(f"{at}.{k}" if isinstance(c, dict) else f"{at}[{k}]", v) for at, c in level
                 if isinstance(c, (list, dict)) for k, v in (c.items() if isinstance(c, dict) else enumerate(c))]
    if level:
        raise UserError(f"{path}: {level[0][0].lstrip('.')} is nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def read_bytes(path, where=None, max_bytes=None, kind="this file"):
    """A file's bytes; a missing, unreadable or too big file is one UserError line."""
    path, where = Path(path), where or str(path)
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise UserError(f"{where}: {size} bytes is too big for {kind} (limit {max_bytes})")
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{where}: is a folder, not a file") from None
    except OSError as e:
        raise UserError(f"{where}: cannot read ({e.strerror})") from None


def decode_text(data, where):
    """bytes (or str) -> str: UTF-8 (a leading BOM dropped) without NUL bytes, else one line."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    if "\x00" in data:
        raise UserError(f"{where}: not a text file (contains NUL bytes)")
    return data.removeprefix("\ufeff")
