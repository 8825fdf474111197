"""Hostile user text in PaLoRA's model card: it must read as text, never become Markdown structure or HTML.

The card is rendered with markdown-it (CommonMark + GFM tables, an implementation independent of ours) and compared
structurally with the card of the same adapter under plain names; the metadata is parsed back with PyYAML.
"""

from __future__ import annotations

import ast
import json
import re

import pytest
import yaml

markdown_it = pytest.importorskip("markdown_it")

HOSTILE_TASKS = [
    "sent`iment <script>alert(1)</script>",
    "# topic [click](http://evil) ![x](y) **bold** _em_ | pipe ~~s~~ $x$ @user www_evil",
]
PLAIN_TASKS = ["sentiment", "topic"]
HOSTILE_BASE = "org/base\n# Injected heading\n```\n<img src=x onerror=alert(1)>\n---\nlicense: evil"
HOSTILE_MODULE = "query`\n## another heading <b>"
BERT_KWARGS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=100)


def _config(task_names, target_modules, newline_in_task: bool = False):
    from peft_palora import PaLoRAConfig

    config = PaLoRAConfig(task_names=list(task_names), r=2, target_modules=list(target_modules))
    if newline_in_task:  # the config refuses it; a card must still be safe for a config edited afterwards
        config.task_names = [config.task_names[0] + "\n# from a task name", config.task_names[1]]
    return config


def _split(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end]), text[end + 5 :]


def _render(body: str):
    return markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"]).parse(body)


def _structure(tokens) -> list[str]:
    """Block structure plus the links and images inside it: what the hostile text must not change."""
    out = []
    for token in tokens:
        out.append(token.type + (token.tag if token.type.startswith("heading") else ""))
        for child in token.children or []:
            if child.type in ("link_open", "image", "html_inline", "s_open", "em_open", "strong_open"):
                out.append(f"{child.type}:{child.attrs.get('href') or child.attrs.get('src') or ''}")
    return out


def _inline_text(token) -> str:
    return "".join(child.content for child in token.children if child.type in ("text", "code_inline"))


@pytest.mark.parametrize("newline_in_task", [False, True], ids=["printable", "newline"])
def test_hostile_names_add_no_structure_to_the_card(newline_in_task):
    from peft_palora.interop.hub import build_model_card

    hostile = build_model_card(
        _config(HOSTILE_TASKS, ["value", HOSTILE_MODULE], newline_in_task),
        base_model=HOSTILE_BASE, repo_id="user/repo`<x>", front_table={HOSTILE_TASKS[1]: [0.5], "acc": ["<i>x</i>"]},
    )
    plain = build_model_card(
        _config(PLAIN_TASKS, ["value", "query"]), base_model="org/base", repo_id="user/repo",
        front_table={"topic": [0.5], "acc": ["x"]},
    )
    text = str(hostile)
    metadata, body = _split(text)
    # No raw HTML reaches a reader: the rendered body holds none of the tags (user text inside the usage snippet's
    # code block is shown as written, which a renderer escapes), and the Markdown outside code blocks has none either.
    html = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(body)
    prose = "".join(token.content for token in _render(body) if token.type != "fence")
    for rendered in (html, prose):
        assert "<script" not in rendered and "<img" not in rendered and "<b>" not in rendered and "<i>" not in rendered
    hostile_tokens, plain_tokens = _render(body), _render(_split(str(plain))[1])
    assert _structure(hostile_tokens) == _structure(plain_tokens)
    assert not any(token.type.startswith("html") for token in hostile_tokens)
    headings = [_inline_text(hostile_tokens[i + 1]) for i, t in enumerate(hostile_tokens) if t.type == "heading_open"]
    assert headings[0] == "PaLoRA adapter for " + " ".join(HOSTILE_BASE.splitlines())
    assert not any("Injected" in heading or "another heading" in heading for heading in headings[1:])

    # The task table shows each name as written (line breaks become spaces), one row per task.
    cells = [_inline_text(hostile_tokens[i + 1]) for i, t in enumerate(hostile_tokens) if t.type == "td_open"]
    task_names = _config(HOSTILE_TASKS, ["v"], newline_in_task).task_names
    assert cells[: 2 * len(task_names)] == [
        item for index, name in enumerate(task_names) for item in (str(index), " ".join(name.splitlines()))
    ]

    # Metadata: exactly the values given, through an independent YAML parser and through huggingface_hub.
    assert metadata["base_model"] == HOSTILE_BASE
    assert f"base_model:adapter:{HOSTILE_BASE}" in metadata["tags"]
    assert "license" not in metadata
    from huggingface_hub import ModelCard

    assert ModelCard(text).data.base_model == HOSTILE_BASE


def test_the_usage_snippet_stays_valid_python_naming_the_tasks():
    from peft_palora.interop.hub import build_model_card

    config = _config(HOSTILE_TASKS, ["value"], newline_in_task=True)
    body = _split(str(build_model_card(config, base_model=HOSTILE_BASE, repo_id='user/"repo"\\`')))[1]
    fences = [t for t in _render(body) if t.type == "fence" and t.info == "python"]
    assert len(fences) == 1
    tree = ast.parse(fences[0].content)
    strings = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    assert HOSTILE_BASE in strings and 'user/"repo"\\`' in strings
    preference = next(
        node.args[0] for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "set_preference"
    )
    assert ast.literal_eval(preference) == {config.task_names[0]: 0.7, config.task_names[1]: 0.3}


@pytest.mark.parametrize(
    "text",
    ["plain", "lambda_0", "a|b", "x\ny", "tab\there", "\u2028sep\u0085", "`<&>`", '"\\', "emoji \U0001f600 café", "\x00\x7f"],
)
def test_python_literal_round_trips(text):
    from peft_palora.tuner.card import _literal as _python_literal

    literal = _python_literal(text)
    assert ast.literal_eval(literal) == text
    assert "\n" not in literal and "\r" not in literal
    # In the usage snippet's fenced code block the literal is shown exactly as written: it cannot end the block.
    tokens = _render(f"```python\nx = {literal}\n```\n")
    assert [(t.type, t.content) for t in tokens] == [("fence", f"x = {literal}\n")]


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("lambda_0", "lambda_0"),  # intraword underscores and plain names are left alone
        ("a|b", "a\\|b"),
        ("{'conv[13]d': 5}", "{'conv[13]d': 5}"),
        ("{'conv1d': 10.0}", "{'conv1d': 10.0}"),
    ],
)
def test_plain_names_are_left_readable(text, kept):
    from peft_palora.tuner.card import escape as _escape_markdown

    assert _escape_markdown(text) == kept


@pytest.mark.parametrize(
    "text",
    [
        "http://evil.example/path", "see www.evil.example", "mail a@b.example", "[x](http://e.example)", "[a][b]",
        "![img](p.png)", "*a* _b_ `c` ~~d~~", "<b>&amp;</b>", "x\n# h", "$$math$$",
    ],
)
def test_escaped_text_renders_as_itself_and_nothing_else(text):
    from peft_palora.tuner.card import escape as _escape_markdown

    escaped = _escape_markdown(text)
    tokens = _render(f"start {escaped} end")
    assert [t.type for t in tokens] == ["paragraph_open", "inline", "paragraph_close"]
    assert [child.type for child in tokens[1].children] in (["text"], ["text", "softbreak", "text"])
    assert _inline_text(tokens[1]) == "start " + " ".join(text.splitlines()) + " end"
    # no autolink triggers survive for linkifiers (GFM autolinks, markdown-it linkify): scheme, www., emails
    assert not re.search(r"[^\\]://|www\.|[^\\]@|[^\\]\.[a-z]", escaped), escaped


def test_metadata_with_hostile_values_round_trips():
    """The card's YAML is written by `ModelCardData` (a YAML serialiser): hostile values parse back as given."""
    from huggingface_hub import ModelCard

    from peft_palora.interop.hub import build_model_card

    base = "a\n---\n<script>x</script>"
    tags = ["ok", "b & c", "- item\n- other", "d\u2028e", "emoji \U0001f600", "x: y", "'q'\"", "#no"]
    text = str(build_model_card(_config(PLAIN_TASKS, ["query"]), base_model=base, tags=tags, license="mit"))
    metadata, _ = _split(text)
    assert metadata["base_model"] == base and metadata["license"] == "mit"
    assert metadata["tags"][-len(tags):] == tags and f"base_model:adapter:{base}" in metadata["tags"]
    assert ModelCard(text).data.to_dict() == metadata
    front_matter = text[4 : text.index("\n---\n", 4)]
    # a document marker ends the front matter only at the start of a line: every line of a value is indented
    assert not [line for line in front_matter.splitlines() if line.startswith(("---", "..."))]


def test_write_model_card_writes_the_card_the_front_and_the_plot(tmp_path):
    import pandas as pd
    from test_hub import tiny_png

    from peft_palora.interop.hub import build_model_card, write_model_card

    config = _config(PLAIN_TASKS, ["query"])
    report = {
        "task_names": PLAIN_TASKS, "metric": "accuracy", "maximize": True, "hypervolume": 0.67, "reference": [0, 0],
        "front": [{"pref_sentiment": 1.0, "pref_topic": 0.0, "sentiment_accuracy": 0.9, "topic_accuracy": 0.5}],
    }
    (tmp_path / "plot.png").write_bytes(tiny_png())
    (tmp_path / "front.json").write_text(json.dumps(report))
    bundle = tmp_path / "bundle"
    path = write_model_card(config, bundle, front=tmp_path / "front.json", plot_path=tmp_path / "plot.png",
                            base_model="org/base")
    assert path == str(bundle / "README.md")
    expected = build_model_card(config, base_model="org/base", front_table=report["front"], hypervolume=0.67,
                                hypervolume_reference=[0, 0], plot_path=tmp_path / "plot.png")
    assert (bundle / "README.md").read_text(encoding="utf-8") == str(expected)
    assert (bundle / "front.png").read_bytes() == tiny_png()
    body = _split(str(expected))[1]
    assert "Hypervolume: **0.67** (reference point (0, 0))" in body and "![Pareto front of this adapter](front.png)" in body

    # the same report given as a mapping, or as its folder; a DataFrame is a table; no front: no section
    assert open(write_model_card(config, bundle, front=report, base_model="org/base"),
                encoding="utf-8").read() == str(build_model_card(config, base_model="org/base",
                                                               front_table=report["front"], hypervolume=0.67,
                                                               hypervolume_reference=[0, 0]))
    write_model_card(config, bundle, front=tmp_path)
    assert "Hypervolume: **0.67**" in (bundle / "README.md").read_text()
    write_model_card(config, bundle, front=pd.DataFrame(report["front"]))
    text = (bundle / "README.md").read_text()
    assert "| 1 | 0 | 0.9 | 0.5 |" in text and "Hypervolume" not in text
    write_model_card(config, bundle)
    assert "## Pareto front" not in (bundle / "README.md").read_text()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"save_directory": 3}, TypeError, "save_directory"),
        ({"front": "missing.json"}, ValueError, "`front`.*does not exist"),
        ({"front": "bad.json"}, ValueError, "`front`.*not a readable JSON"),
        ({"front": "deep.json"}, ValueError, "`front`.*not a readable JSON"),
        ({"front": "notreport.json"}, ValueError, "`front`.*no front report"),
        ({"front": 3}, TypeError, "front_table"),
        ({"plot_path": "plot.pdf"}, ValueError, "plot_path"),
        ({"plot_path": "nope.png"}, ValueError, "plot_path"),
        ({"licence": "mit"}, TypeError, "unexpected keyword"),
    ],
)
def test_write_model_card_rejects_bad_input_before_writing(tmp_path, monkeypatch, kwargs, error, message):
    from peft_palora.interop.hub import write_model_card

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "notreport.json").write_text('{"rows": []}')
    (tmp_path / "plot.pdf").write_bytes(b"%PDF")
    arguments = {"save_directory": tmp_path / "bundle", **kwargs}
    with pytest.raises(error, match=message):
        write_model_card(_config(PLAIN_TASKS, ["query"]), **arguments)
    assert not (tmp_path / "bundle").exists()
    # the file given as `save_directory` is refused as well
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="save_directory"):
        write_model_card(_config(PLAIN_TASKS, ["query"]), tmp_path / "file")


def test_save_pretrained_writes_the_palora_card(tmp_path):
    """`save_pretrained` of a PaLoRA model writes PaLoRA's card, not PEFT's blank template."""
    import torch
    from peft import get_peft_model
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = get_peft_model(BertModel(BertConfig(**BERT_KWARGS)), _config(PLAIN_TASKS, ["query"]))
    model.save_pretrained(tmp_path / "bundle")
    metadata, body = _split((tmp_path / "bundle" / "README.md").read_text(encoding="utf-8"))
    assert metadata["library_name"] == "peft" and "palora" in metadata["tags"]
    assert "## Tasks" in body and "| 0 | sentiment |" in body and "More Information Needed" not in body
