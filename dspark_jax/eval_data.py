"""Evaluation prompt sets of the paper's offline protocol (spec §8): benchmark names, their public Hugging Face
datasets, local `{"turns": [...]}` JSONL files, and the protocol's selection of prompts.

A name resolves, in this order, to
  * a path ending in `.jsonl` (any local set; its name is the file's stem);
  * `DIR/NAME.jsonl` when a data folder is given (`--data-dir`), e.g. the DeepSpec `eval_datasets/` folder;
  * a known benchmark (HUB_SETS): its data files are fetched once through `huggingface_hub` (the hub cache; with
    HF_HUB_OFFLINE=1 only the cache is read), converted to `{"turns": [...]}` rows and kept as
    `HF_HOME/dspark_jax/eval_datasets/NAME.jsonl` (with `NAME.source.json` naming the dataset snapshot), which later
    runs read without touching the hub.

Selection (the reference evaluator's): a set with more rows than its cap is shuffled with
`random.Random(seed).shuffle` and the first `cap` rows are kept; only `turns[0]` is used. numpy-free on purpose.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import random
from collections.abc import Callable

from dspark_jax.errors import UsageError, first_line

EVAL_SEED = 980406  # the reference evaluator's seed
CONVERTED_SUBDIR = "dspark_jax/eval_datasets"  # under HF_HOME: the hub sets after conversion
DEFAULT_CAP = 500  # prompts per set, unless the set has its own cap below
MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
HUMANEVAL_PREFIX = "Write a solution to the following problem and make sure that it passes the tests:\n"
LCB_INSTRUCTION = (
    "You are an expert Python programmer. You will be given a question (problem specification) and will generate a "
    "correct Python program that matches the specification and passes all tests. You will NOT return anything except "
    "for the program"
)


def _math(field: str) -> Callable[[dict], list[str]]:
    return lambda row: [row[field] + MATH_SUFFIX]


def _field(field: str) -> Callable[[dict], list[str]]:
    return lambda row: [row[field]]


def _humaneval(row: dict) -> list[str]:
    return [f"{HUMANEVAL_PREFIX}```python\n{row['prompt']}\n```"]


def _livecodebench(row: dict) -> list[str]:
    if row.get("starter_code"):
        fmt, code = "### Format: Use the following code structure:", f"```python\n{row['starter_code']}\n```"
    else:
        fmt, code = "### Format: Write your code in the following format:", "```python\n# YOUR CODE HERE\n```"
    question = f"### Question:\n{row['question_content']}"
    return [f"{LCB_INSTRUCTION}\n\n{question}\n\n{fmt}\n{code}\n\n### Answer: (use the provided format with backticks)"]


def _alpaca(row: dict) -> list[str]:
    extra = row.get("input") or ""
    return [f"{row['instruction']}\n\nInput:\n{extra}" if extra else row["instruction"]]


def _mt_bench(row: dict) -> list[str]:
    return list(row["turns"] if "turns" in row else row["prompt"])


@dataclasses.dataclass(frozen=True)
class HubSet:
    """Where a benchmark's prompts live on the Hugging Face hub and how one source row becomes its turns."""

    repo: str  # dataset repo id
    files: tuple[str, ...]  # fnmatch patterns of the data files (jsonl or parquet), read in this order
    split: str  # the config/split those files hold (documentation; the files decide)
    field: str  # the source field the prompt is built from (documentation)
    convert: Callable[[dict], list[str]]
    cap: int = DEFAULT_CAP  # the paper's number of prompts (spec §8)
    domain: str = "other"


# The paper's sets (spec §8), plus the extra sets the DeepSpec eval_datasets folder carries (aime24, lbpp).
HUB_SETS: dict[str, HubSet] = {
    "gsm8k": HubSet("openai/gsm8k", ("main/test-*.parquet",), "main/test", "question", _math("question"), 500, "math"),
    "math500": HubSet("HuggingFaceH4/MATH-500", ("test.jsonl",), "test", "problem", _math("problem"), 500, "math"),
    "aime25": HubSet(
        "MathArena/aime_2025", ("data/train-*.parquet",), "train", "problem", _math("problem"), 30, "math"
    ),
    "humaneval": HubSet(
        "openai/openai_humaneval", ("openai_humaneval/test-*.parquet",), "test", "prompt", _humaneval, 164, "code"
    ),
    "mbpp": HubSet(
        "google-research-datasets/mbpp",
        ("sanitized/test-*.parquet",),
        "sanitized/test",
        "prompt",
        _field("prompt"),
        256,
        "code",
    ),
    "livecodebench": HubSet(
        "livecodebench/code_generation_lite",
        tuple(f"test{i}.jsonl" for i in ("", 2, 3, 4, 5, 6)),  # release_v6: 1055 problems (several GB with tests)
        "test (release_v6)",
        "question_content, starter_code",
        _livecodebench,
        500,
        "code",
    ),
    "mt-bench": HubSet(
        "HuggingFaceH4/mt_bench_prompts", ("raw/question.jsonl",), "train", "turns", _mt_bench, 80, "chat"
    ),
    "alpaca": HubSet(
        "tatsu-lab/alpaca", ("data/train-*.parquet",), "train", "instruction, input", _alpaca, 500, "chat"
    ),
    "arena-hard-v2": HubSet(
        "lmarena-ai/arena-hard-auto",
        ("data/arena-hard-v2.0/question.jsonl",),
        "v2.0",
        "prompt",
        _field("prompt"),
        500,
        "chat",
    ),
    "aime24": HubSet(
        "HuggingFaceH4/aime_2024", ("data/train-*.parquet",), "train", "problem", _math("problem"), 30, "math"
    ),
    "lbpp": HubSet(
        "CohereLabs/lbpp", ("python/test.parquet",), "python/test", "instruction", _field("instruction"), 500, "code"
    ),
}
# The default --benchmarks: the paper's sets that the DeepSpec eval_datasets folder ships (alpaca is not there).
PAPER_BENCHMARKS = ("gsm8k", "math500", "aime25", "humaneval", "mbpp", "livecodebench", "mt-bench", "arena-hard-v2")


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """One resolved benchmark: its name, the JSONL file it was read from, the selected first turns and the cap."""

    name: str
    path: str
    prompts: list[str]  # turns[0] of the selected rows, in evaluation order
    total_rows: int  # rows in the file before selection
    source: str  # "local" or the hub dataset id


def converted_dir() -> str:
    """Where hub sets are kept after conversion: HF_HOME/dspark_jax/eval_datasets."""
    from huggingface_hub import constants

    return os.path.join(constants.HF_HOME, *CONVERTED_SUBDIR.split("/"))


def _json_lines(path: str, label: str):
    """(line number, parsed row) for every non-blank line of a JSONL file; unreadable files and lines that are not
    JSON are one-line UsageErrors starting with `label`."""
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError:
                    raise UsageError(f"{label} line {n} is not JSON") from None
    except (OSError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UsageError(f"cannot read {path} ({type(e).__name__}: {first})") from None


def _turns(row) -> list[str] | None:
    turns = row.get("turns") if isinstance(row, dict) else None
    return turns if isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns) else None


def read_turns_jsonl(path: str) -> list[list[str]]:
    """The `turns` of every row of a `{"turns": ["...", ...]}` JSONL file; a bad row is a one-line UsageError."""
    rows = []
    for n, row in _json_lines(path, path):
        turns = _turns(row)
        if turns is None:
            raise UsageError(f'{path} line {n} needs "turns": a non-empty list of strings')
        rows.append(turns)
    if not rows:
        raise UsageError(f"{path} holds no prompts")
    return rows


def read_prompt_rows(path: str, flag: str, id_keys: tuple[str, ...]) -> list[list[int] | str]:
    """The prompts of a JSONL file given as `flag`: per row, token ids (a non-empty list of integers under one of
    `id_keys`) or the first turn of `"turns"` (a non-empty list of strings). Any other row is a one-line
    UsageError naming the flag, the line and the accepted forms."""
    label = f"{flag} {path}"
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path!r} {'is a folder, not a file' if os.path.isdir(path) else 'does not exist'}")
    forms = [f'"{k}": a non-empty list of token ids' for k in id_keys] + ['"turns": a non-empty list of strings']
    accepted = " or ".join(forms)
    prompts = []
    for n, row in _json_lines(path, label):
        key = next((k for k in id_keys if isinstance(row, dict) and k in row), None)
        if key is not None:
            ids = row[key]
            if isinstance(ids, list) and ids and all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                prompts.append(ids)
                continue
        elif _turns(row) is not None:
            prompts.append(row["turns"][0])
            continue
        raise UsageError(f"{label} line {n} needs {accepted}")
    if not prompts:
        raise UsageError(f"{label} holds no prompts")
    return prompts


def select(rows: list, cap: int, seed: int) -> list:
    """At most `cap` rows: all of them in file order when they fit, else the first `cap` after a seeded shuffle."""
    if len(rows) <= cap:
        return list(rows)
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:cap]


def check_data_dir(data_dir: str) -> str:
    """`data_dir` if it is a readable folder, else a one-line UsageError."""
    if not os.path.isdir(data_dir):
        what = "is a file, not a folder" if os.path.exists(data_dir) else "does not exist"
        raise UsageError(f"--data-dir {data_dir!r} {what}; pass a folder of NAME.jsonl files in the turns format")
    try:
        os.listdir(data_dir)
    except OSError as e:
        raise UsageError(f"--data-dir {data_dir!r} is not readable ({type(e).__name__})") from None
    return data_dir


def parse_names(text: str) -> list[str]:
    """The comma-separated --benchmarks value as a list; `paper` stands for PAPER_BENCHMARKS."""
    names = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        names.extend(PAPER_BENCHMARKS if part == "paper" else [part])
    if not names:
        raise UsageError("--benchmarks is empty; give names such as gsm8k,mt-bench or paths to .jsonl files")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"--benchmarks names {dupes[0]!r} twice; give each set once")
    return names


def locate(name: str, data_dir: str | None) -> tuple[str, str | None]:
    """(label, local file or None for a hub set) of one --benchmarks entry, without reading anything large."""
    if name.endswith(".jsonl"):
        path = os.path.expanduser(name)
        if not os.path.isfile(path):
            raise UsageError(f"--benchmarks file {name!r} does not exist")
        return os.path.splitext(os.path.basename(path))[0], path
    if data_dir is not None:
        path = os.path.join(data_dir, f"{name}.jsonl")
        if not os.path.isfile(path):
            have = sorted(f[: -len(".jsonl")] for f in os.listdir(data_dir) if f.endswith(".jsonl"))
            raise UsageError(
                f"--data-dir {data_dir!r} has no {name}.jsonl (it has: {', '.join(have) or 'no .jsonl files'})"
            )
        return name, path
    if name not in HUB_SETS:
        raise UsageError(
            f"--benchmarks {name!r} is not a known set (accepted: {', '.join(HUB_SETS)}, 'paper', a path to a "
            ".jsonl file, or any NAME with --data-dir DIR holding NAME.jsonl)"
        )
    return name, None


def load_sets(names: list[str], data_dir: str | None, num_prompts: int | None, seed: int) -> list[PromptSet]:
    """Resolve every name first (so a bad one fails before any download), then read and select each set.

    num_prompts: the cap for every set; None = each set's own cap (spec §8; DEFAULT_CAP for sets without one).
    """
    if data_dir is not None:
        check_data_dir(data_dir)
    located = [(name, *locate(name, data_dir)) for name in names]
    labels = [label for _, label, _ in located]
    clash = sorted({label for label in labels if labels.count(label) > 1})
    if clash:
        raise UsageError(f"--benchmarks has two sets named {clash[0]!r}; rename one of the files")
    out = []
    for name, label, path in located:
        source = "local"
        if path is None:
            path, source = hub_jsonl(name), HUB_SETS[name].repo
        rows = read_turns_jsonl(path)
        cap = num_prompts if num_prompts is not None else (HUB_SETS[label].cap if label in HUB_SETS else DEFAULT_CAP)
        prompts = [turns[0] for turns in select(rows, cap, seed)]
        out.append(PromptSet(label, path, prompts, len(rows), source))
    return out


# ------------------------------------------------------------------------------------------------ hub download


def _read_source_file(path: str, repo: str, name: str) -> list[dict]:
    """Rows of one downloaded data file (JSON lines or parquet) as dicts."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError(
                f"benchmark {name!r}: {repo} ships parquet, which needs pyarrow (pip install pyarrow); "
                f"or pass --data-dir DIR holding {name}.jsonl"
            ) from None
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def hub_jsonl(name: str, cache_dir: str | None = None, out_dir: str | None = None) -> str:
    """The converted `{"turns": [...]}` JSONL of hub set `name`, downloading and converting it on first use.

    cache_dir: the huggingface_hub cache (default: its own); out_dir: where converted sets live (default:
    converted_dir()). A converted file, once written, is used as is (no hub request).
    """
    src = HUB_SETS[name]
    out_dir = out_dir or converted_dir()
    path = os.path.join(out_dir, f"{name}.jsonl")
    if os.path.isfile(path):
        return path
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = huggingface_hub.snapshot_download(
            src.repo, repo_type="dataset", allow_patterns=list(src.files), cache_dir=cache_dir
        )
    except LocalEntryNotFoundError:
        raise UsageError(
            f"benchmark {name!r} ({src.repo}) is not in the Hugging Face cache and the hub is offline or unreachable; "
            f"pass --data-dir DIR holding {name}.jsonl"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise UsageError(
            f"benchmark {name!r}: download of {src.repo} failed ({first_line(e)}); "
            f"pass --data-dir DIR with {name}.jsonl"
        ) from None
    files = []
    for pattern in src.files:
        files += sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(folder)
            for f in names
            if fnmatch.fnmatch(os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/"), pattern)
        )
    if not files:
        raise UsageError(f"benchmark {name!r}: {src.repo} has no file matching {', '.join(src.files)}")
    rows = []
    for file in files:
        for n, row in enumerate(_read_source_file(file, src.repo, name), 1):
            try:
                turns = src.convert(row)
            except (KeyError, TypeError):
                raise UsageError(f"benchmark {name!r}: {os.path.basename(file)} row {n} lacks {src.field}") from None
            rows.append({"turns": [str(t) for t in turns]})
    os.makedirs(out_dir, exist_ok=True)
    source = {
        "repo": src.repo,
        "revision": os.path.basename(os.path.normpath(folder)),  # the snapshot folder is named by the commit
        "files": [os.path.relpath(f, folder).replace(os.sep, "/") for f in files],
        "split": src.split,
        "field": src.field,
        "rows": len(rows),
    }
    for target, text in (
        (os.path.join(out_dir, f"{name}.source.json"), json.dumps(source, indent=1) + "\n"),
        (path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)),  # last: its presence means done
    ):
        tmp = f"{target}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    return path


__all__ = [
    "DEFAULT_CAP",
    "EVAL_SEED",
    "HUB_SETS",
    "PAPER_BENCHMARKS",
    "HubSet",
    "PromptSet",
    "check_data_dir",
    "converted_dir",
    "hub_jsonl",
    "load_sets",
    "locate",
    "parse_names",
    "read_turns_jsonl",
    "select",
]
