"""`gptlab download`: a model from the Hugging Face hub (or any endpoint that speaks its API, `HF_ENDPOINT`) into
the local cache, optionally imported into a gptlab checkpoint. Honours `HF_HUB_OFFLINE` and the cache (`HF_HOME`):
offline, a cached model is used and a missing one is a one-line error."""

from __future__ import annotations

from pathlib import Path

from gptlab.errors import GptlabError

WANTED = ["config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "tokenizer.json",
          "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json", "special_tokens_map.json",
          "chat_template.jinja", "chat_template.json", "tokenizer.model"]  # the tokenizer and its chat template


def download(repo_id: str, revision: str | None = None) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise GptlabError("gptlab download needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=WANTED))
    except LocalEntryNotFoundError:
        raise GptlabError(f"cannot download {repo_id}: offline (HF_HUB_OFFLINE) or the hub is unreachable, and it "
                          "is not in the local cache") from None
    except GatedRepoError:
        raise GptlabError(f"{repo_id} is gated: accept its license on the hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise GptlabError(f"no model {repo_id} on the hub (or it is private)") from None
    except RevisionNotFoundError:
        raise GptlabError(f"{repo_id} has no revision {revision}") from None
    except (OSError, ValueError) as e:  # network errors and the hub's HTTP errors
        raise GptlabError(f"cannot download {repo_id}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
