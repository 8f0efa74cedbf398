"""MkDocs hook: the parts of the site that are generated from the repository at build time, so they cannot drift.

- ``<!-- segvoc:config-reference -->`` (``reference/config.md``): every config group, option and key of ``conf/``,
  with the comments of its YAML file and what ``conf/schema.yaml`` accepts for it (``segvoc.config.describe``, the
  words of the refusals);
- ``<!-- segvoc:entry-points -->``: the commands, from each ``conf/<command>.yaml`` usage line and module docstring;
- ``<!-- segvoc:bench-options -->``: the options of ``python -m segvoc.bench``, read from its ``parse_args``;
- ``<!-- segvoc:module-map -->``: every module with the first sentence of its docstring, and what each folder may
  import (``tests/test_structure.py``'s ``MAY_IMPORT``, the rule that test enforces).

Sources are read, not imported (the docs build needs no torch): YAML with PyYAML plus a comment scanner, Python
with ``ast``. Anything it cannot read stops the build (``PluginError``), as a broken link does under ``--strict``.
"""

from __future__ import annotations

import ast
import html
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
# the commands and the config each composes; order of the CLI page
COMMANDS = [
    ("segvoc.train", "train"), ("segvoc.evaluate", "evaluate"), ("segvoc.predict", "predict"),
    ("segvoc.export", "export"), ("segvoc.report", "report"), ("segvoc.data.prepare", "prepare"),
    ("segvoc.data.check", "check"), ("segvoc.demo", None), ("segvoc.bench", None),
]
NOT_CONFIGS = ("schema.yaml",)  # conf/schema.yaml is the table of rules, not a config to compose


# ---------------------------------------------------------------- reading YAML with its comments


def _split_comment(line: str) -> tuple[str, str | None, int]:
    """``(code, comment or None, column of the '#')``: a ``#`` starts a comment at the line's start or after
    whitespace, outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"" and (i == 0 or line[i - 1] in " :[{,-"):
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip(), line[i + 1:].strip(), i
    return line.rstrip(), None, -1


_KEY = re.compile(r"^(?P<key>[^\s#:'\"\[{][^:#]*?|'[^']*'|\"[^\"]*\"):(?:\s+(?P<rest>.*))?$")


class YamlFile:
    """A config file: its description (the leading comment block), its package line, its values, and per key path
    (a tuple of keys and list indices) the comment written beside or above it and the value as typed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        try:
            self.data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise PluginError(f"{self.rel}: not readable as YAML ({exc})") from exc
        if not isinstance(self.data, dict):
            raise PluginError(f"{self.rel}: expected a mapping at the top")
        self.package: str | None = None
        self.header: list[str] = []
        self.comments: dict[tuple, str] = {}
        self.typed: dict[tuple, str] = {}
        self._scan(text.splitlines())

    def _scan(self, lines: list[str]) -> None:
        i = 0
        while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
            comment = lines[i].strip()[1:].removeprefix(" ").rstrip()
            if comment.startswith("@package"):
                self.package = comment.split(None, 1)[1].strip()
            elif lines[i].strip():
                self.header.append(comment)
            i += 1
        stack: list[tuple[int, tuple]] = []
        counters: dict[tuple, int] = {}
        pending: list[str] = []
        last: tuple | None = None
        last_indent, continues = 0, False
        for line in lines[i:]:
            if not line.strip():
                pending, continues = [], False
                continue
            code, comment, column = _split_comment(line)
            if not code.strip():
                if continues and last is not None and column > last_indent:
                    self.comments[last] = f"{self.comments[last]} {comment}".strip()
                else:
                    pending.append(comment or "")
                    continues = False
                continue
            indent = len(code) - len(code.lstrip(" "))
            body = code.strip()
            if body.startswith("- ") or body == "-":
                while stack and stack[-1][0] > indent:
                    stack.pop()
                if stack and stack[-1][0] == indent and isinstance(stack[-1][1][-1], int):
                    stack.pop()  # the previous item of this list
                parent = stack[-1][1] if stack else ()
                index = counters.get(parent, 0)
                counters[parent] = index + 1
                item = (*parent, index)
                stack.append((indent, item))
                rest = body[1:].lstrip()
                inner = indent + (len(body) - len(rest))
                match = _KEY.match(rest)
                path = item
                if match:
                    path = (*item, self._key(match["key"]))
                    stack.append((inner, path))
                    self.typed[path] = (match["rest"] or "").strip()
                else:
                    self.typed[path] = rest
            else:
                match = _KEY.match(body)
                if not match:  # a continuation of a multi-line value
                    continue
                while stack and stack[-1][0] >= indent:
                    stack.pop()
                parent = stack[-1][1] if stack else ()
                path = (*parent, self._key(match["key"]))
                stack.append((indent, path))
                self.typed[path] = (match["rest"] or "").strip()
            words = [c for c in [*pending, comment or ""] if c]
            if words:
                self.comments[path] = " ".join(words)
            pending, last, last_indent, continues = [], path, indent, comment is not None

    @staticmethod
    def _key(text: str) -> str:
        return text.strip().strip("'\"")

    def description(self) -> str:
        """The leading comment block as HTML: prose lines joined into paragraphs; a usage line (``python -m ...``)
        and indented lines (tables of settings) kept as they are written."""
        out, prose, kept = [], [], []

        def flush() -> None:
            if prose:
                out.append(f"<p>{_cell(' '.join(prose))}</p>")
                prose.clear()
            if kept:
                out.append(f"<pre><code>{html.escape(chr(10).join(kept))}</code></pre>")
                kept.clear()

        for line in self.header:
            if line.startswith("python -m ") or line.startswith("  "):
                if prose:
                    flush()
                kept.append(line.rstrip())
            else:
                if kept:
                    flush()
                prose.append(line.strip())
        flush()
        return "\n".join(out) + ("\n\n" if out else "")


def _flow(value: Any) -> str:
    """A value as one line of YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip().removesuffix("...")\
        .strip()


def _dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ---------------------------------------------------------------- the config reference page


def _rules() -> tuple[dict[str, Any], Any, Any]:
    """``conf/schema.yaml``'s rules and segvoc's own words for them (``segvoc.config``: omegaconf only)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        from segvoc.config import describe, rule_for, schema
    except ImportError as exc:
        raise PluginError(f"the config reference needs segvoc.config (omegaconf): {exc}") from exc
    rules, _ = schema()
    return rules, rule_for, describe


def _cell(text: str, code: bool = False) -> str:
    """Plain text for an HTML table cell (or paragraph): escaped, with its `backtick` spans as code."""
    text = html.escape(text)
    if code:  # long keys and values may break after a dot, a slash or a comma, never inside a word
        return "<code>" + re.sub(r"([./,])", r"\1<wbr>", text) + "</code>" if text else ""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)




class Reference:
    """Builds ``reference/config.md``."""

    def __init__(self) -> None:
        self.rules, self.rule_for, self.describe = _rules()
        self.keys = 0

    def rows(self, doc: YamlFile, prefix: str) -> list[tuple[str, str, str, str]]:
        """``(key, default, accepted values, what it does)`` for every key of a file, in file order."""
        out: list[tuple[str, str, str, str]] = []

        def walk(node: Any, path: tuple) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    if not path and key == "defaults":
                        continue
                    here = (*path, key)
                    full = f"{prefix}.{_dotted(here)}" if prefix else _dotted(here)
                    typed = doc.typed.get(here, "")
                    rule = self.rule_for(full, self.rules)
                    accepts = self.describe(rule) if rule else ""
                    what = doc.comments.get(here) or (rule or {}).get("what", "")
                    nested = isinstance(value, dict) and value or (
                        isinstance(value, list) and value and all(isinstance(v, dict) for v in value))
                    shown = "" if nested else (typed if typed and not typed.startswith(("[", "{", "|", ">"))
                                               or typed and _balanced(typed) else _flow(value))
                    out.append((full, shown, accepts, what))
                    self.keys += 1
                    if nested:
                        walk(value, here)
            elif isinstance(node, list):
                for index, item in enumerate(node):
                    here = (*path, index)
                    full = f"{prefix}.{_dotted(here)}" if prefix else _dotted(here)
                    what = doc.comments.get(here) or next(
                        (doc.comments[(*here, k)] for k in (item if isinstance(item, dict) else {})
                         if (*here, k) in doc.comments), "")
                    out.append((full, _flow(item), "", what))
                    self.keys += 1

        walk(doc.data, ())
        return out

    def table(self, doc: YamlFile, prefix: str) -> str:
        rows = self.rows(doc, prefix)
        if not rows:
            return "<p><em>No keys: choosing this option sets nothing.</em></p>\n"
        body = "\n".join(
            f"<tr><td>{_cell(key, True)}</td><td>{_cell(value, True)}</td><td>{_cell(accepts)}</td>"
            f"<td>{_cell(what)}</td></tr>" for key, value, accepts, what in rows)
        return ('<div class="segvoc-config"><table>\n<thead><tr><th>key</th><th>default</th><th>accepts</th>'
                f"<th>what it does</th></tr></thead>\n<tbody>\n{body}\n</tbody>\n</table></div>\n")

    @staticmethod
    def defaults(doc: YamlFile) -> str:
        entries = doc.data.get("defaults") or []
        if not entries:
            return ""
        items = []
        for index, entry in enumerate(entries):
            text = entry if isinstance(entry, str) else ", ".join(f"{k}: {_flow(v)}" for k, v in entry.items())
            comment = doc.comments.get(("defaults", index)) or next(
                (doc.comments[("defaults", index, k)] for k in (entry if isinstance(entry, dict) else {})
                 if ("defaults", index, k) in doc.comments), "")
            items.append(f"<code>{html.escape(text)}</code>" + (f": {_cell(comment)}" if comment else ""))
        return "<p>Composed from (Hydra defaults list, in order): " + "; ".join(items) + ".</p>\n\n"

    def command(self, name: str) -> str:
        doc = YamlFile(CONF / f"{name}.yaml")
        return (f"### `{name}` {{ #command-{name} }}\n\n`{doc.rel}`\n\n{doc.description()}"
                f"{self.defaults(doc)}{self.table(doc, '')}\n")

    def group(self, group: str, picked: dict[str, list[str]]) -> str:
        folder = CONF / group
        options = sorted(folder.glob("*.yaml"))
        used = "; ".join(f"`{command}`: `{choice}`" for command, choice in picked.get(group, []))
        anchor = group.replace("/", "-")
        out = [f"### `{group}` {{ #{anchor} }}\n\n"
               f"Pick one with `{group}=<option>`: {', '.join(f'`{o.stem}`' for o in options)}."
               + (f" Default per command: {used}." if used else "") + "\n\n"]
        for option in options:
            doc = YamlFile(option)
            if doc.package == "_global_":
                prefix, where = "", "keys from the config's root (`@package _global_`)"
            elif doc.package:
                prefix, where = doc.package, f"keys under `{doc.package}`"
            else:
                prefix, where = group.replace("/", "."), f"keys under `{group.replace('/', '.')}`"
            out.append(f"#### `{group}={option.stem}` {{ #{anchor}-{option.stem} }}\n\n`{doc.rel}` ({where})\n\n"
                       f"{doc.description()}{self.defaults(doc)}{self.table(doc, prefix)}\n")
        return "".join(out)

    def page(self) -> str:
        commands = [p.stem for p in sorted(CONF.glob("*.yaml")) if p.name not in NOT_CONFIGS]
        groups = sorted({p.parent.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml") if p.parent != CONF})
        picked: dict[str, list[str]] = {}
        for command in commands:
            for entry in YamlFile(CONF / f"{command}.yaml").data.get("defaults") or []:
                if isinstance(entry, dict):
                    for key, value in entry.items():
                        group = key.split("@")[0].removeprefix("override ").strip("/")
                        picked.setdefault(group, []).append((command, _flow(value)))
        parts = [
            "## Commands\n\n",
        ]
        parts += [self.command(c) for c in commands]
        parts.append("## Groups\n\n")
        parts += [self.group(g, picked) for g in groups]
        parts.append(f"\n<p><em>{self.keys} keys in {len(commands)} commands and {len(groups)} groups.</em></p>\n")
        return "".join(parts)


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
    return depth == 0


# ---------------------------------------------------------------- commands, bench options, module map


def _docstring(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text())
    except SyntaxError as exc:
        raise PluginError(f"{path}: {exc}") from exc
    return ast.get_docstring(tree) or ""


def _first_paragraph(text: str) -> str:
    return " ".join(text.strip().split("\n\n")[0].split())


def _first_sentence(text: str) -> str:
    para = _first_paragraph(text)
    match = re.match(r"(.+?[.!?])(\s|$)", para)
    return (match.group(1) if match else para).rstrip(":.") + "."


def _md(text: str) -> str:
    """Docstring text (reStructuredText ``literals``) as Markdown, on one line for a table cell."""
    return text.replace("``", "`").replace("|", "\\|")


def entry_points() -> str:
    rows = ["| command | config | what it does |", "|---|---|---|"]
    for module, config in COMMANDS:
        path = ROOT / (module.replace(".", "/") + ".py")
        if not path.is_file():
            path = ROOT / module.replace(".", "/") / "__main__.py"
        if not path.is_file():
            raise PluginError(f"{module}: no module file (docs/hooks/segvoc_docs.py COMMANDS)")
        text = _docstring(path)
        if module == "segvoc.bench":
            text = _docstring(ROOT / "segvoc" / "bench" / "benchmark.py")
        summary = _first_paragraph(text)
        summary = re.sub(r"^``python -m [^`]*``(?: \(``make \w+``\))?:\s*", "", summary)
        link = f"[`conf/{config}.yaml`](config.md#command-{config})" if config else "–"
        rows.append(f"| `python -m {module}` | {link} | {_md(summary)} |")
    return "\n".join(rows) + "\n"


def bench_options() -> str:
    path = ROOT / "segvoc" / "bench" / "benchmark.py"
    tree = ast.parse(path.read_text())
    parser = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "parse_args"), None)
    if parser is None:
        raise PluginError(f"{path}: no parse_args")
    constants: dict[str, Any] = {}
    for node in tree.body:  # module-level constants (REPORT_MODELS, SECTIONS, ...) that defaults and choices name
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue

    def shown(value: ast.expr) -> str:
        if isinstance(value, ast.Name) and value.id == "available":
            return "an option of conf/model/"
        try:  # a literal, or an expression of the constants above
            result = eval(compile(ast.Expression(value), "<bench>", "eval"), {"__builtins__": {"list": list}},
                          dict(constants))  # noqa: S307 - segvoc's own source, no builtins
        except Exception:  # noqa: BLE001 - anything else is shown as written
            return ast.unparse(value)
        if result is None:
            return "–"
        return ", ".join(map(str, result)) if isinstance(result, list | tuple) else str(result)

    rows = ["| option | default | what it does |", "|---|---|---|"]
    for node in ast.walk(parser):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            continue
        flags = [a.value for a in node.args if isinstance(a, ast.Constant)]
        kw = {k.arg: k.value for k in node.keywords}
        help_node = kw.get("help")
        help_text = "" if help_node is None else (
            help_node.value if isinstance(help_node, ast.Constant) else ast.unparse(help_node))
        if "choices" in kw:
            help_text = f"{help_text} (choices: {shown(kw['choices'])})".strip()
        action = ast.unparse(kw["action"]) if "action" in kw else ""
        default = shown(kw["default"]) if "default" in kw else ("off" if "store_true" in action else "")
        if "BooleanOptionalAction" in action:
            flags = [f"{flags[0]} / --no-{flags[0][2:]}"]
        rows.append(f"| `{' '.join(flags)}` | `{default}` | {_md(help_text)} |".replace("| `` |", "| |"))
    return "\n".join(rows) + "\n"


def module_map() -> str:
    structure = ast.parse((ROOT / "tests" / "test_structure.py").read_text())
    may_import: dict[str, set[str]] | None = None
    for node in structure.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "MAY_IMPORT"
                                                for t in node.targets):
            may_import = ast.literal_eval(node.value)
    if may_import is None:
        raise PluginError("tests/test_structure.py: no MAY_IMPORT")
    rows = ["| folder | modules (first line of each docstring) | may import |", "|---|---|---|"]
    top = sorted(p for p in (ROOT / "segvoc").glob("*.py") if p.name != "__init__.py")
    cells = [f"`{p.stem}`: {_md(_first_sentence(_docstring(p)))}" for p in top]
    rows.append(f"| `segvoc/` | {'<br>'.join(cells)} | entry points: anything but `bench`; "
                f"base helpers: each other; `app`: {', '.join(sorted(may_import['app'] - {'base'}))} |")
    for folder in sorted(p for p in (ROOT / "segvoc").iterdir() if (p / "__init__.py").is_file()):
        if folder.name not in may_import:
            raise PluginError(f"segvoc/{folder.name}: not in tests/test_structure.py MAY_IMPORT")
        cells = [f"`{p.stem}`: {_md(_first_sentence(_docstring(p)))}"
                 for p in sorted(folder.glob("*.py")) if p.name != "__init__.py"]
        allowed = sorted(may_import[folder.name] - {folder.name})
        rows.append(f"| `segvoc/{folder.name}/` | {'<br>'.join(cells)} | {', '.join(f'`{a}`' for a in allowed)} |")
    plugin = ROOT / "hydra_plugins" / "segvoc_optuna" / "segvoc_optuna_sweeper.py"
    rows.append(f"| `hydra_plugins/segvoc_optuna/` | `segvoc_optuna_sweeper`: "
                f"{_md(_first_sentence(_docstring(plugin)))} | `segvoc` |")
    return "\n".join(rows) + "\n"


MARKERS = {
    "<!-- segvoc:config-reference -->": lambda: Reference().page(),
    "<!-- segvoc:entry-points -->": entry_points,
    "<!-- segvoc:bench-options -->": bench_options,
    "<!-- segvoc:module-map -->": module_map,
}


# ---------------------------------------------------------------- MkDocs events


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    for marker, build in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, build())
    return markdown
