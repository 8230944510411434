"""The embedded pair's corpus: CPython standard-library sources, a fixed held-out split, and a byte-level BPE.

`python -m dspark_jax.training.corpus --out DIR` writes `tokenizer.json`, `train.txt` / `heldout.txt` (file lists)
and `train.jsonl` / `heldout.jsonl` (token ids per file) so the training CLI can read either.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig

from dspark_jax.cli_util import OneLineArgumentParser
from dspark_jax.errors import DSparkError, UsageError

EOS = "<|endoftext|>"
MASK = "<|mask|>"
SPECIAL_TOKENS = (EOS, MASK)


def stdlib_files(root: str | None = None) -> list[str]:
    """Sorted paths of the interpreter's standard-library `.py` files (no site-packages, no test suites)."""
    root = root or sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return out


def is_heldout(relpath: str, percent: int = 5) -> bool:
    """A fixed hash of the path (not of Python's salted hash) picks about `percent`% of files for evaluation."""
    return int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % 100 < percent


def split(files: list[str], root: str, percent: int = 5) -> tuple[list[str], list[str]]:
    train, heldout = [], []
    for path in files:
        (heldout if is_heldout(os.path.relpath(path, root), percent) else train).append(path)
    return train, heldout


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):
        return None


def train_tokenizer(files: list[str], vocab_size: int):
    """A byte-level BPE (tokenizers library) with the EOS and mask specials at ids 0 and 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = (t for t in map(read_text, files) if t)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(
        prog="python -m dspark_jax.training.corpus",
        description="Build the stdlib code corpus and its BPE tokenizer.",
        epilog="example:\n  python -m dspark_jax.training.corpus --out corpus --vocab-size 4096",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--heldout-percent", type=int, default=5)
    args = p.parse_args(argv)
    try:
        if args.vocab_size < 258:
            raise UsageError(f"--vocab-size must be at least 258 (bytes + specials), got {args.vocab_size}")
        root = sysconfig.get_paths()["stdlib"]
        train, heldout = split(stdlib_files(root), root, args.heldout_percent)
        os.makedirs(args.out, exist_ok=True)
        tok = train_tokenizer(train, args.vocab_size)
        tok.save(os.path.join(args.out, "tokenizer.json"))
        eos = tok.token_to_id(EOS)
        for name, files in (("train", train), ("heldout", heldout)):
            with open(os.path.join(args.out, f"{name}.txt"), "w") as f:
                f.write("\n".join(os.path.relpath(x, root) for x in files) + "\n")
            with open(os.path.join(args.out, f"{name}.jsonl"), "w") as f:
                for path in files:
                    text = read_text(path)
                    if text:
                        ids = tok.encode(text).ids + [eos]
                        f.write(json.dumps({"path": os.path.relpath(path, root), "ids": ids}) + "\n")
    except DSparkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(train)} train / {len(heldout)} held-out files -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
