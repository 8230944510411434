"""CLI `python -m conversion.convert`: a safetensors checkpoint (folder or hub id) to an orbax folder.

The work is in loader.py (folder -> state, orbax write) and engine.py (the key-map engine). They sit in their own
modules, not here as style.md §2 sketches, so that `dspark_jax.loading` can use them without importing this CLI.
`plan` and `convert_state` stay importable from here.
"""

from __future__ import annotations

import argparse
import sys

from conversion.engine import convert_state, plan
from conversion.loader import convert_checkpoint
from conversion.reader import open_checkpoint
from dspark_jax.cli_util import OneLineArgumentParser, add_parallel_flags, pop_parallel
from dspark_jax.errors import DSparkError, UsageError
from dspark_jax.sharding import make_mesh


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="python -m conversion.convert",
        description="Convert a safetensors checkpoint (folder or hub id) to an orbax one.",
        epilog="""examples:
  python -m conversion.convert --src Qwen/Qwen3-4B --dst ckpt/qwen3-4b
  python -m conversion.convert --src /data/DeepSeek-V4-Flash --dst ckpt/v4-flash --mesh data=1,model=2,expert=4""",
    )
    p.add_argument("--src", required=True, help="HF-style folder or Hugging Face repo id")
    p.add_argument("--dst", required=True, help="output folder (written atomically)")
    p.add_argument(
        "--kind",
        default="auto",
        choices=(
            "auto",
            "qwen3",
            "qwen3_moe",
            "dspark",
            "dflash",
            "dspark_gemma4",
            "dflash_gemma4",
            "gemma4",
            "deepseek_v4",
        ),  # fmt: skip
    )
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument(
        "--mesh",
        default="data=1,model=1,expert=1",
        help="mesh axis sizes, e.g. data=1,model=4 (this process's first devices; with several processes: all "
        "devices of all of them)",
    )
    add_parallel_flags(p, mesh=False)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    parallel = pop_parallel(args)
    try:
        if parallel.multi_process:  # every process reads and writes its own shards of the one checkpoint
            mesh = parallel.start()
        else:
            parallel.validate()
            mesh = make_mesh(parallel.mesh)
        convert_checkpoint(args.src, args.dst, kind=args.kind, dtype=args.dtype, mesh=mesh)
    except DSparkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


__all__ = ["plan", "convert_state", "convert_checkpoint", "main", "open_checkpoint", "UsageError"]

if __name__ == "__main__":
    sys.exit(main())
