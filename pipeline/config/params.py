"""The params file: read safely, parsed into the schema, and the repository folders it refers to."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .. import REPO_ROOT
from .schema import ConfigError, Params, PrepareConfig, parse

PARAMS = REPO_ROOT / "params.yaml"
RESULTS = REPO_ROOT / "results"
STUDY_RESULTS = "study"
"""The study stage's out folder under results/: the results of the tables of `study.tables` (`dvc repro`'s)."""
REPORTS = REPO_ROOT / "reports"

MAX_YAML_VALUES = 100_000
"""Values a params file may hold once its aliases are expanded (the repository's holds a few thousand)."""


class _BoundedLoader(yaml.SafeLoader):
    """Safe YAML whose aliases (`*name`) may not expand past MAX_YAML_VALUES values: nine nested aliases of
    nine uses each (a "billion laughs" file) would otherwise hang validation and fill the memory."""

    def construct_document(self, node: yaml.Node) -> Any:
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise yaml.constructor.ConstructorError(
                None, None, f"more than {MAX_YAML_VALUES} values once its aliases (*name) are expanded",
                node.start_mark)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """A key given twice in one mapping is an error (plain YAML keeps the last silently: a table row whose
        name is repeated would vanish); a merge (`<<: *name`) may still be overridden."""
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                            f"found the key {key!r} twice", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Values under `node` with every alias expanded, each shared node measured once."""
    if id(node) not in sizes:
        sizes[id(node)] = 0  # a recursive alias adds nothing more
        children = (node.value if isinstance(node, yaml.SequenceNode) else
                    [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def load_params(path: str | Path = PARAMS) -> Params:
    """Parse and cross-check a params file (structure only; `study.rows.table_rows` builds the models)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("params", str(path), "an existing params.yaml")
    try:
        data = yaml.load(path.read_text(), Loader=_BoundedLoader)
    except yaml.YAMLError as err:
        raise ConfigError("params", str(path), f"valid YAML of at most {MAX_YAML_VALUES} values "
                          f"({_yaml_problem(err)})") from None
    if isinstance(data, dict) and "seed" in data:  # the key `seeds:` replaced
        raise ConfigError("seed", data["seed"], "no `seed:` key: `seeds:`, a list (e.g. `seeds: [0]`; every row "
                          "trains once per seed)")
    return parse(Params, data)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What is wrong and where, on one line (PyYAML's own text spans several, quoting the file). Where PyYAML
    gives a context (the bracket or mapping left open), it is named with the line it opened at: the line
    where PyYAML gave up may be far below the mistake."""
    text = f"{getattr(err, 'problem', None) or err}{_at(getattr(err, 'problem_mark', None))}"
    context, opened = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and opened is not None:
        text += f"; {context} opened{_at(opened)}"
    return " ".join(text.split())


def _at(mark: yaml.Mark | None) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def data_dir(out: str) -> str:
    """The folder a dataset's `out` names (a relative one is taken from the repository root)."""
    path = Path(out)
    return str(path if path.is_absolute() else REPO_ROOT / path)


def results_dir(params: Params, table: str, results: Path = RESULTS) -> Path:
    """The folder of `table`'s `<table>.json|csv` under `results`: the study stage's out folder `study/` for a table
    of `study.tables` (what `dvc repro` trains, whoever trains it), `results` itself for any other (Tables 1-3 and
    the proxy, trained by name outside `dvc repro`, which DVC must never delete)."""
    return results / STUDY_RESULTS if table in params.study.tables else results


def profile_datasets(params: Params, names: list[str] | None = None) -> dict[str, PrepareConfig]:
    """The `datasets:` entries to prepare: `names`, or the active profile's `dataset` and `reid_dataset`."""
    names = names or [n for n in (params.active.dataset, params.active.reid_dataset) if n]
    for name in names:
        if name not in params.datasets:
            raise ConfigError("datasets", name, "a key of `datasets`: " + ", ".join(params.datasets))
    return {n: params.datasets[n] for n in names}
