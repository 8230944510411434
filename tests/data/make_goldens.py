"""Rebuild tests/data/goldens/ from the full DeepSpec golden folder (the one holding markov/, rnn/, dflash/).

    python tests/data/make_goldens.py PATH/TO/deepspec_qwen3_tiny [--out tests/data/goldens]

What it keeps, and why the copy is small (tests/data/goldens/README.md says the same for readers):
- target/: the three variants' target folders are byte-identical (same seed); it is stored once, after a check.
- <variant>/draft, <variant>/draft_distilled: config.json and model.safetensors copied byte for byte.
- arrays.npz: only the golden arrays the tests read (the name lists below), stored as "<variant>.<name>", except
  that an array of 1 KiB or more that an earlier name already holds is stored once (the target-side arrays repeat
  across variants, the round-0 context features repeat the prefill features, a dflash draft's adjusted logits
  equal its base logits). aliases.json maps variant -> golden name -> the stored name it reuses;
  tests/conftest.py `golden_arrays` puts a variant's arrays back together.
Dropped: meta.json, target_prefill_logits, the verify_* / accepted / next_token arrays of the T = 0 rounds, the
round_* detail of the loops except round_anchor_pos, every *_output_ids and the t1_e2e_* loop.

The output is deterministic (fixed zip timestamps, sorted names), so a rebuild from the same goldens gives the
same bytes.
"""

import argparse
import filecmp
import hashlib
import io
import json
import pathlib
import shutil
import sys
import zipfile

import numpy as np

VARIANTS = ("markov", "rnn", "dflash")
DRAFTS = ("draft", "draft_distilled")
TARGET_FILES = ("config.json", "generation_config.json", "model.safetensors")
DRAFT_FILES = ("config.json", "model.safetensors")

# Golden names the tests read (tests/test_draft.py, test_loop.py, test_training.py, test_generate_draft_cli.py).
# Names a variant lacks (confidence arrays in dflash, residual_probs outside rnn's round 1) are simply absent.
TOP = (
    "prompt_ids prompt_features target_greedy_new_ids dist_num_full_rounds loss_weights_ce_l1_conf loss_total "
    "loss_ce loss_l1 loss_confidence loss_weight_sum loss_total_dflash_weights"
).split()
TRAIN = (
    "input_ids loss_mask anchor_positions block_keep target_features target_last_hidden attention_mask position_ids "
    "target_ids prev_token_ids eval_mask loss_weights ctx_projected block_hidden base_logits draft_logits "
    "target_logits confidence_logits ce_per_slot l1_per_slot alpha bce_per_slot metric_accept_rate metric_tau"
).split()
ROUND = (
    "anchor_pos anchor_token draft_cache_len_before draft_cache_len_after ctx_positions block_positions ctx_features "
    "ctx_projected block_hidden base_logits adjusted_logits draft_tokens confidence_logits"
).split()
T1_ROUND = "draft_probs verify_target_logits target_probs accept_probs accepted next_token residual_probs".split()
LOOP = "new_ids acceptance_lengths proposal_lengths accepted_draft_lengths round_anchor_pos".split()
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
MIN_SHARED_BYTES = 1024  # smaller arrays are stored under their own name (an alias would save next to nothing)


def kept(names: list[str], dist_rounds: int) -> list[str]:
    """The subset of one variant's golden names that the tests read, sorted."""
    rounds = ["t0_r0_", "t0_r1_", "t1_r0_", "t1_r1_"] + [f"dist_t0_r{k}_" for k in range(dist_rounds)]
    wanted = set(TOP) | {"train_" + s for s in TRAIN}
    wanted |= {p + s for p in rounds for s in ROUND}
    wanted |= {p + s for p in ("t1_r0_", "t1_r1_") for s in T1_ROUND}
    wanted |= {p + s for p in ("e2e_", "dist_e2e_") for s in LOOP}
    return sorted(set(names) & wanted)


def fingerprint(a: np.ndarray) -> str:
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + np.ascontiguousarray(a).tobytes()).hexdigest()


def write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed's format (np.load reads it) with fixed timestamps, so equal arrays give equal bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def copy_files(src: pathlib.Path, dst: pathlib.Path, names: tuple[str, ...]) -> None:
    dst.mkdir(parents=True)
    for name in names:
        shutil.copyfile(src / name, dst / name)


def build(src: pathlib.Path, out: pathlib.Path) -> None:
    for v in VARIANTS[1:]:
        for name in TARGET_FILES:
            if not filecmp.cmp(src / VARIANTS[0] / "target" / name, src / v / "target" / name, shallow=False):
                sys.exit(f"error: target/{name} differs between {VARIANTS[0]} and {v}; the copy stores one target")
    if out.exists():
        shutil.rmtree(out / "target", ignore_errors=True)
        for v in VARIANTS:
            shutil.rmtree(out / v, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    copy_files(src / VARIANTS[0] / "target", out / "target", TARGET_FILES)

    stored: dict[str, np.ndarray] = {}  # stored name -> array
    by_print: dict[str, str] = {}  # fingerprint -> stored name (first variant.name that had it)
    aliases: dict[str, dict[str, str]] = {v: {} for v in VARIANTS}
    for v in VARIANTS:
        for d in DRAFTS:
            copy_files(src / v / d, out / v / d, DRAFT_FILES)
        with np.load(src / v / "goldens.npz", allow_pickle=False) as z:
            names = kept(z.files, int(z["dist_num_full_rounds"]))
            for name in names:
                a, own = z[name], f"{v}.{name}"
                key = by_print.setdefault(fingerprint(a), own) if a.nbytes >= MIN_SHARED_BYTES else own
                if key == own:
                    stored[own] = a
                else:
                    aliases[v][name] = key
    write_npz(out / "arrays.npz", stored)
    (out / "aliases.json").write_text(json.dumps(aliases, indent=1, sort_keys=True) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    n_alias = sum(map(len, aliases.values()))
    print(f"{out}: {len(stored) + n_alias} golden names, {len(stored)} stored, {size / 2**20:.2f} MiB in all")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=pathlib.Path, help="folder holding markov/, rnn/, dflash/")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent / "goldens")
    args = parser.parse_args(argv)
    build(args.src, args.out)


if __name__ == "__main__":
    main()
