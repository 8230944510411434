"""Turn a checkpoint argument (local folder or Hugging Face repo id) into a local folder; nothing else.

Low level on purpose: `conversion` and `dspark_jax.loading` both resolve checkpoints through it, so neither has to
import the other to do so.
"""

from __future__ import annotations

import os

from dspark_jax.errors import UsageError, first_line

# What a hub download may fetch (README "Security"): weights only as safetensors, never pickles; *.md is docs only.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "chat_template.jinja", "*.md"]


def resolve(path_or_id: str) -> str:
    """A local folder for `path_or_id`: the folder itself, or the hub snapshot from the local cache / network.

    With HF_HUB_OFFLINE=1 only the cache is consulted and a miss fails at once.
    """
    if not isinstance(path_or_id, str) or not path_or_id:
        raise UsageError(f"checkpoint must be a folder or a Hugging Face repo id, got {path_or_id!r}")
    if path_or_id.startswith("~"):  # `--target=~/x` reaches us unexpanded by the shell
        path_or_id = os.path.expanduser(path_or_id)
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id):
        raise UsageError(f"checkpoint {path_or_id!r} is a file; pass the folder holding config.json and safetensors")
    parts = path_or_id.split("/")
    looks_like_id = len(parts) == 2 and all(parts) and not path_or_id.startswith((".", "~"))
    if not looks_like_id:
        raise UsageError(f"checkpoint folder {path_or_id!r} does not exist")
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return huggingface_hub.snapshot_download(path_or_id, allow_patterns=HUB_PATTERNS)
    except LocalEntryNotFoundError:
        raise UsageError(
            f"checkpoint {path_or_id!r} is neither a local folder nor in the Hugging Face cache (offline)"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise UsageError(f"checkpoint {path_or_id!r}: hub download failed ({first_line(e)})") from None


__all__ = ["HUB_PATTERNS", "resolve"]
