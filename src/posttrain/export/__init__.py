"""`posttrain export RUN --out DIR`: where a post-trained model goes next.

    export_run("runs/support-bot", "exported/", gguf=("q8_0",), push_to_hub="me/support-bot")

RUN is a finished run or a pipeline output. DIR gets a merged HF checkpoint (an adapter is
folded into the weights), its tokenizer, a model card (README.md, `card.model_card`) and, when
asked, GGUF files (`gguf.write_gguf`). `push_to_hub` uploads DIR with `huggingface_hub`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from posttrain.export.card import CardError, model_card, read_lineage
from posttrain.export.gguf import GGUFExportError, write_gguf
from posttrain.models import adapters
from posttrain.models.loading import load


class ExportError(ValueError):
    """An export that cannot be done; the message says what to change."""


def export_run(run, out, *, gguf: tuple = (), push_to_hub: Optional[str] = None, private: bool = False,
               license: str = "other", name: Optional[str] = None) -> dict:
    """Write the merged model, its tokenizer and README.md into `out` (plus GGUF files); optionally upload.

    Returns {"out": Path, "files": [...], "gguf": [...], "url": str | None}.
    """
    try:
        lin = read_lineage(run)
    except CardError as e:
        raise ExportError(str(e)) from None
    dest = Path(out)
    if dest.exists() and any(dest.iterdir()):
        raise ExportError(f"{dest} is not empty; export into a new directory")
    model, tok = load(lin.final_model, adapter=lin.final_adapter, device="cpu")
    try:
        model = adapters.merge(model)
    except ValueError as e:  # prompt / prefix tuning: nothing to fold into the weights
        raise ExportError(f"{run}: {e}") from None
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest), safe_serialization=True)
    tok.save_pretrained(str(dest))
    written = []
    for kind in gguf:
        try:
            written.append(write_gguf(dest, dest / f"model-{kind}.gguf", kind).name)
        except GGUFExportError as e:
            raise ExportError(str(e)) from None
    title = name or Path(run).resolve().name
    (dest / "README.md").write_text(model_card(lin, name=title, license=license, gguf_files=tuple(written)),
                                    encoding="utf-8")
    url = upload(dest, push_to_hub, private=private) if push_to_hub else None
    return {"out": dest, "files": sorted(p.name for p in dest.iterdir()), "gguf": written, "url": url}


def upload(folder: Path, repo_id: str, *, private: bool = False) -> str:
    """Create the model repository if needed and upload `folder`; the token comes from `hf auth login` or $HF_TOKEN."""
    try:
        from huggingface_hub import HfApi  # installed with transformers
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    except ImportError:
        raise ExportError("--push-to-hub needs huggingface_hub: pip install huggingface_hub") from None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ExportError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; {folder} is complete, upload it later "
                          f"with `hf upload {repo_id} {folder}`")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message="posttrain export")
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot push to {repo_id} ({first}); {folder} is complete, upload it later with "
                          f"`hf upload {repo_id} {folder}`") from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
