"""Publishing a PaLoRA bundle on the Hub with its card, in one commit (what `push_to_hub` does on PaLoRA models).

transformers' `PushToHubMixin.push_to_hub` (which `PeftModel` inherits) saves into a temporary folder -- writing
PaLoRA's card there -- and then overwrites `README.md` with the repository's card or a generic one
(`library_name: transformers`). So PaLoRA models keep their own `push_to_hub`: save, write PaLoRA's card over the
saved one (keeping metadata added on the Hub, such as a license), add the front plot, delete a stale one, and send it
all with one `HfApi.create_commit` (not `upload_folder`, which may split a folder over several commits with `hf_xet`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peft_palora.tuner.card import (
    CARD_NAME,
    PLOT_STEM,
    PLOT_SUFFIXES,
    build_model_card,
    resolve_palora_config,
    write_model_card,
)

DEFAULT_COMMIT_MESSAGE = "Upload PaLoRA adapter"


def _main_process() -> bool:
    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return True
    return bool(PartialState().is_main_process)


def push_palora_to_hub(
    model: Any,
    repo_id: str,
    *,
    front_table: Any = None,
    hypervolume: float | None = None,
    hypervolume_reference: Sequence[float] | None = None,
    plot_path: str | os.PathLike | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    commit_description: str | None = None,
    tags: Sequence[str] | None = None,
    is_main_process: bool | None = None,
    **card_kwargs: Any,
) -> Any:
    """Publish `model` (a PaLoRA `PeftModel`, or a wrapper such as `MultiTaskModel`) with PaLoRA's card.

    Everything `model.save_pretrained` writes goes up in one commit with the card (`build_model_card` with the
    front arguments, `tags` and `card_kwargs`: `base_model`, `pipeline_tag`, `license`, `adapter_name`) and the plot
    as `front.<suffix>`. Input is validated before the Hub is contacted. Only the main process pushes
    (`is_main_process`, default accelerate's); the others return None. Returns the `CommitInfo`.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        resolve_palora_config(model, card_kwargs.get("adapter_name"))
    except TypeError:
        raise TypeError(f"`model` must be a model with PaLoRA adapters, got {type(model).__name__}.") from None
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"`repo_id` must be a non-empty string, got {repo_id!r}.")
    if not isinstance(commit_message, str) or not commit_message.strip():
        raise ValueError(f"`commit_message` must be a non-empty string, got {commit_message!r}.")
    unknown = sorted(set(card_kwargs) - {"base_model", "pipeline_tag", "license", "adapter_name"})
    if unknown:
        raise TypeError(f"push_palora_to_hub() got unexpected keyword arguments: {unknown}.")
    if plot_path is not None and (not isinstance(plot_path, (str, os.PathLike)) or not os.path.isfile(plot_path)):
        raise ValueError(f"`plot_path` must be an existing image file, got {plot_path!r}.")
    card_arguments = dict(front_table=front_table, hypervolume=hypervolume, hypervolume_reference=hypervolume_reference,
                          plot_path=plot_path, tags=tags, **card_kwargs)
    build_model_card(model, repo_id=repo_id, **card_arguments)  # validate everything before touching the Hub
    if not (_main_process() if is_main_process is None else is_main_process):
        return None

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if revision is not None and not create_pr and not revision.startswith("refs/"):
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    try:
        previous = ModelCard.load(api.hf_hub_download(repo_id, CARD_NAME, revision=revision, token=token),
                                  ignore_metadata_errors=True).data.to_dict()
    except (EntryNotFoundError, RevisionNotFoundError):
        previous = {}
    adapter_name = card_arguments.pop("adapter_name", None)
    with tempfile.TemporaryDirectory(prefix="palora-push-") as staging:
        model.save_pretrained(staging, is_main_process=True)
        card_path = write_model_card(model, staging, adapter_name=adapter_name, repo_id=repo_id, front=front_table,
                                     **{k: v for k, v in card_arguments.items() if k != "front_table" and v is not None})
        card = ModelCard.load(card_path)
        for key, value in previous.items():  # metadata a user added on the Hub (license, datasets, ...) stays
            if key == "tags":
                card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *(value or [])]))
            elif card.data.get(key) is None and value is not None:
                card.data[key] = value
        card.save(card_path)
        files = sorted(path for path in Path(staging).rglob("*") if path.is_file())
        stale_plots = [
            CommitOperationDelete(path_in_repo=path)
            for path in api.list_repo_files(repo_id, revision=revision, token=token)
            if "/" not in path and Path(path).stem == PLOT_STEM and Path(path).suffix in PLOT_SUFFIXES
            and not (Path(staging) / path).exists()
        ]
        operations = stale_plots + [
            CommitOperationAdd(path_in_repo=path.relative_to(staging).as_posix(), path_or_fileobj=str(path))
            for path in files
        ]
        return api.create_commit(repo_id, operations=operations, commit_message=commit_message,
                                 commit_description=commit_description, token=token, revision=revision,
                                 create_pr=create_pr)
